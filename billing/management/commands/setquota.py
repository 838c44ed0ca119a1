from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.models import PricingPlan
from billing.money import usd
from billing.services import account_quota_set

CLEAR = {"none", "unlimited", "off"}


def _money(option: str, raw: str) -> Decimal | None:
    if raw.strip().lower() in CLEAR:
        return None
    try:
        value = usd(raw)  # parsed as Decimal from the text, never through float
    except ValueError:
        raise CommandError(f"--{option} must be a USD amount such as 25 or 12.50 (or 'none'), got {raw!r}.") from None
    if value < 0:
        raise CommandError(f"--{option} must not be negative, got {raw!r}.")
    return value


def _tokens(option: str, raw: str) -> int | None:
    if raw.strip().lower() in CLEAR:
        return None
    if not raw.strip().isdigit():
        raise CommandError(f"--{option} must be a whole number of tokens (or 'none'), got {raw!r}.")
    return int(raw)


class Command(BaseCommand):
    help = (
        "Set a user's pricing plan and budgets (calendar days and months in BILLING_TIME_ZONE). "
        "Options not given are left as they are; 'none' clears a limit."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", help="The user whose billing account to change (created if missing).")
        parser.add_argument("--plan", help="Pricing plan name, or 'none' for catalog prices.")
        parser.add_argument("--monthly-budget", help="Monthly spend limit in USD, e.g. 25.00, or 'none'.")
        parser.add_argument("--daily-budget", help="Daily spend limit in USD, e.g. 2.50, or 'none'.")
        parser.add_argument("--monthly-tokens", help="Monthly limit on prompt + completion tokens, or 'none'.")
        parser.add_argument("--daily-tokens", help="Daily limit on prompt + completion tokens, or 'none'.")
        parser.add_argument("--soft-threshold", help="Fraction of a limit that triggers a warning, e.g. 0.8.")

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        try:
            user = user_model.objects.get(**{user_model.USERNAME_FIELD: options["username"]})
        except user_model.DoesNotExist:
            raise CommandError(f"No user named {options['username']!r}.") from None
        changes: dict = {}
        if options["plan"] is not None:
            if options["plan"].strip().lower() in CLEAR:
                changes["plan"] = None
            else:
                try:
                    changes["plan"] = PricingPlan.objects.get(name=options["plan"])
                except PricingPlan.DoesNotExist:
                    names = ", ".join(PricingPlan.objects.values_list("name", flat=True)) or "none defined"
                    raise CommandError(f"No pricing plan named {options['plan']!r} (plans: {names}).") from None
        for option, field in (("monthly_budget", "monthly_spend_limit_usd"), ("daily_budget", "daily_spend_limit_usd")):
            if options[option] is not None:
                changes[field] = _money(option.replace("_", "-"), options[option])
        for option, field in (("monthly_tokens", "monthly_token_limit"), ("daily_tokens", "daily_token_limit")):
            if options[option] is not None:
                changes[field] = _tokens(option.replace("_", "-"), options[option])
        if options["soft_threshold"] is not None:
            try:
                threshold = usd(options["soft_threshold"])
            except ValueError:
                threshold = Decimal(-1)
            if not Decimal(0) < threshold <= Decimal(1):
                raise CommandError(f"--soft-threshold must be a fraction above 0 and at most 1, got {options['soft_threshold']!r}.")
            changes["soft_threshold"] = threshold
        try:
            account = account_quota_set(user_id=user.pk, **changes)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        except ValueError as error:
            raise CommandError(str(error)) from None

        def show(value: object) -> str:
            return "none" if value is None else str(value)

        self.stdout.write(
            f"{user.get_username()}: plan {account.plan.name if account.plan else 'none (catalog prices)'}; "
            f"monthly {show(account.monthly_spend_limit_usd)} USD / {show(account.monthly_token_limit)} tokens; "
            f"daily {show(account.daily_spend_limit_usd)} USD / {show(account.daily_token_limit)} tokens; "
            f"warn at {account.soft_threshold}."
        )
