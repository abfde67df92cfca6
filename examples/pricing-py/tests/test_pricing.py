from pricing import LineItem, Order, tier_discount


def test_no_discount_below_the_first_tier():
    assert tier_discount(9) == 0


def test_tier_thresholds_are_inclusive():
    assert tier_discount(10) == 5
    assert tier_discount(50) == 10
    assert tier_discount(100) == 15


def test_line_total_applies_the_tier():
    assert LineItem("pen", 200, 50).total_cents() == 9000  # 10000 minus 10%


def test_coupon_never_makes_an_order_negative():
    order = Order([LineItem("pen", 100, 1)], coupon_cents=500, tax_percent=8)
    assert order.total_cents() == 0


def test_tax_on_discounted_subtotal():
    order = Order([LineItem("book", 1000, 2)], coupon_cents=500, tax_percent=10)
    assert order.total_cents() == 1650
