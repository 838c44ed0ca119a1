from typing import Any

from django.apps import AppConfig
from django.apps import apps as global_apps
from django.db import DEFAULT_DB_ALIAS
from django.db.models.signals import post_delete, post_migrate, post_save


def load_default_prices(sender: AppConfig, *, using: str = DEFAULT_DB_ALIAS, apps: Any = global_apps, **kwargs: Any) -> None:
    """After migrate (and after a test flush), add the default catalog's missing prices.

    A fresh database thus never serves a known model unpriced; prices already present, including
    ones staff changed, are kept.
    """
    try:
        state_price = apps.get_model("billing", "Price")
    except LookupError:  # migrated only part of the way: no Price table yet
        return
    from billing.models import Price

    def field_types(model: Any) -> dict[str, type]:
        return {field.name: type(field) for field in model._meta.concrete_fields}

    if field_types(state_price) != field_types(Price):
        return  # migrated part of the way: the table is not yet what the model writes (e.g. before 0003)
    from billing.services import price_defaults_load

    price_defaults_load(using=using)


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        post_migrate.connect(load_default_prices, sender=self, dispatch_uid="billing.load_default_prices")
        from billing import pricing_cache
        from billing.models import Account, AccountPrice, PlanPrice, Price, PricingPlan

        for model in (Account, AccountPrice, PlanPrice, Price, PricingPlan):
            for signal in (post_save, post_delete):
                signal.connect(pricing_cache.clear, sender=model, dispatch_uid=f"billing.pricing_cache.{model.__name__}.{signal}")
