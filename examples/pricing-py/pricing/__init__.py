"""Order pricing: volume tiers, coupons and tax, computed in integer cents."""

from pricing.tiers import tier_discount
from pricing.order import Order, LineItem

__all__ = ["LineItem", "Order", "tier_discount"]
