"""Staff roles: the "Cost viewers" group, view-only access to the cost console for staff who are
not superusers.

A member sees every billing list and detail page (prices, plans, accounts, the ledger, rollups,
holds) and the API keys, and may export costs; every write (adding a key, revoking, suspending,
editing a price or a budget) is refused, because the group holds only `view_*` permissions. The
group is kept up after every `migrate` (and after a test database flush), so its permissions follow
the models; permissions staff added to it by hand are left alone. Give someone access with
`is_staff` and membership of the group (admin, Users).
"""

from __future__ import annotations

from typing import Any

from django.apps import apps as global_apps
from django.db import DEFAULT_DB_ALIAS
from django.db.models import Q

COST_VIEWERS = "Cost viewers"
# (app label, model name): each gets its view permission.
COST_MODELS = (
    ("billing", "price"),
    ("billing", "pricingplan"),
    ("billing", "planprice"),
    ("billing", "account"),
    ("billing", "accountprice"),
    ("billing", "usagerecord"),
    ("billing", "dailyusage"),
    ("billing", "reservation"),
    ("llmgateway", "apikey"),
)


def cost_viewers_group_sync(*, using: str = DEFAULT_DB_ALIAS, apps: Any = global_apps) -> None:
    """Create the group if needed and give it the view permission of every cost model there is."""
    group_model = apps.get_model("auth", "Group")
    permission_model = apps.get_model("auth", "Permission")
    which = Q()
    for app_label, model in COST_MODELS:
        which |= Q(content_type__app_label=app_label, content_type__model=model, codename=f"view_{model}")
    wanted = list(permission_model.objects.using(using).filter(which))
    group, _ = group_model.objects.using(using).get_or_create(name=COST_VIEWERS)
    group.permissions.add(*wanted)


def sync_after_migrate(sender: Any, *, using: str = DEFAULT_DB_ALIAS, apps: Any = global_apps, **kwargs: Any) -> None:
    """`post_migrate` receiver for the last app with cost models: their permissions exist by then."""
    try:
        apps.get_model("auth", "Group")
    except LookupError:  # migrated only part of the way
        return
    cost_viewers_group_sync(using=using, apps=apps)
