"""Volume discounts: buying at least `threshold` units of one item earns `percent` off that line."""

# (threshold, percent), ascending by threshold
TIERS = [(10, 5), (50, 10), (100, 15)]


def tier_discount(quantity: int) -> int:
    """The discount percentage for a line of `quantity` units."""
    percent = 0
    for threshold, tier_percent in TIERS:
        if quantity > threshold:
            percent = tier_percent
    return percent
