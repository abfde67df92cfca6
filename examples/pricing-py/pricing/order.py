"""An order: line items, an optional coupon, and tax on the discounted subtotal."""

from dataclasses import dataclass, field

from pricing.tiers import tier_discount


@dataclass
class LineItem:
    sku: str
    unit_cents: int
    quantity: int

    def total_cents(self) -> int:
        gross = self.unit_cents * self.quantity
        return gross - gross * tier_discount(self.quantity) // 100


@dataclass
class Order:
    items: list[LineItem] = field(default_factory=list)
    coupon_cents: int = 0
    tax_percent: int = 0

    def subtotal_cents(self) -> int:
        return sum(item.total_cents() for item in self.items)

    def total_cents(self) -> int:
        discounted = self.subtotal_cents() - self.coupon_cents
        return discounted + discounted * self.tax_percent // 100
