from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from calls.control import StopOrder, stop_calls_sync
from llmgateway.models import ApiKey


class Command(BaseCommand):
    help = (
        "Stop running calls in every gateway process (through the channel layer: Redis when "
        "REDIS_URL is set): one call by its request id, or every call of an API key or a user. "
        "Their clients get an error event (code stopped_by_staff) and their ledger rows say so."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--request-id", help="The call's x-request-id (its ledger row's request_id).")
        parser.add_argument("--key-prefix", help="Every call of the API key with this prefix (as listed in the admin).")
        parser.add_argument("--user", help="Every call of this username.")

    def handle(self, *args: Any, **options: Any) -> None:
        given = [name for name in ("request_id", "key_prefix", "user") if options[name]]
        if len(given) != 1:
            raise CommandError("Give exactly one of --request-id, --key-prefix or --user.")
        order = StopOrder(reason="stopped_by_staff", request_id=options["request_id"])
        if options["key_prefix"]:
            key = ApiKey.objects.filter(prefix=options["key_prefix"]).first()
            if key is None:
                raise CommandError(f"No API key has the prefix {options['key_prefix']!r}.")
            order = StopOrder(reason="stopped_by_staff", api_key_id=key.pk)
        if options["user"]:
            user = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: options["user"]}).first()
            if user is None:
                raise CommandError(f"No user is named {options['user']!r}.")
            order = StopOrder(reason="stopped_by_staff", user_id=user.pk)
        stop_calls_sync(order)
        self.stdout.write("Stop order sent to every gateway process.")
