"""Billing's refusals, raised before any upstream call; the API edge maps them to HTTP.

    BillingError
    ├── PriceMissing      the model has no price: never a free call
    └── QuotaExceeded     the call's worst case does not fit a budget
"""

from __future__ import annotations


class BillingError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PriceMissing(BillingError):
    pass


class QuotaExceeded(BillingError):
    pass
