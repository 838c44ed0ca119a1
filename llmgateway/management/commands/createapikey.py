from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_datetime

from llmgateway.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for USERNAME (creating the user if needed). The key is printed once, alone on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", help="Owner of the key; created if it does not exist.")
        parser.add_argument("--name", default="", help="A label for the key, shown in the admin.")
        parser.add_argument("--expires", default=None, help="Expiry as an ISO 8601 datetime (e.g. 2027-01-01T00:00:00Z).")
        parser.add_argument("--rpm", type=int, default=None, help="Requests per minute for this key.")
        parser.add_argument("--tpm", type=int, default=None, help="Tokens per minute for this key.")
        parser.add_argument("--max-concurrent", type=int, default=None, help="Concurrent streams for this key.")

    def handle(self, *args: Any, **options: Any) -> None:
        expires_at: datetime | None = None
        if options["expires"]:
            expires_at = parse_datetime(options["expires"])
            if expires_at is None or expires_at.tzinfo is None:
                raise CommandError("--expires must be an ISO 8601 datetime with a time zone, e.g. 2027-01-01T00:00:00Z")
        for flag in ("rpm", "tpm", "max_concurrent"):
            if options[flag] is not None and options[flag] < 1:
                raise CommandError(f"--{flag.replace('_', '-')} must be a positive integer")
        api_key, raw_key = api_key_create(
            username=options["username"],
            name=options["name"],
            expires_at=expires_at,
            rpm_limit=options["rpm"],
            tpm_limit=options["tpm"],
            max_concurrent=options["max_concurrent"],
        )
        self.stderr.write(f"Created key {api_key.prefix}… for {options['username']}. It is shown once; store it now.")
        self.stdout.write(raw_key)
