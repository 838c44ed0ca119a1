import getpass
import sys
from typing import Any

from django.contrib.auth import get_user_model, password_validation
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from llmgateway.logins import password_set_path

NO_SUCH_USER = "No user {username!r}: create one with createapikey, or pass --create."
PASSWORDS_DIFFER = "The two passwords differ."
EMPTY_PASSWORD = "No password was given on standard input."


class Command(BaseCommand):
    help = (
        "Give USERNAME a login for the chat page and their account page. By default print a one-time "
        "link where they choose their password (valid for PASSWORD_RESET_TIMEOUT, 3 days by default, "
        "and once). With --password-stdin, set the password read from standard input instead (or "
        "prompted for on a terminal). A password is never taken on the command line."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", help="The user, e.g. one made by createapikey.")
        parser.add_argument(
            "--base-url", default="http://127.0.0.1:8000",
            help="The gateway's address as the user reaches it, put before the link's path (default: http://127.0.0.1:8000).",
        )
        parser.add_argument(
            "--password-stdin", action="store_true",
            help="Set the password now: read it from standard input (its first line), or prompt twice on a terminal.",
        )
        parser.add_argument("--create", action="store_true", help="Create the user if there is none of that name.")

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        username = options["username"]
        user = user_model.objects.filter(**{user_model.USERNAME_FIELD: username}).first()
        if user is None:
            if not options["create"]:
                raise CommandError(NO_SUCH_USER.format(username=username))
            user = user_model.objects.create_user(**{user_model.USERNAME_FIELD: username}, password=None)
        if not options["password_stdin"]:
            link = options["base_url"].rstrip("/") + password_set_path(user=user)
            self.stderr.write(f"Send {username} this link to choose a password. It works once.")
            self.stdout.write(link)
            return
        password = self._read_password()
        try:
            password_validation.validate_password(password, user)
        except ValidationError as error:
            raise CommandError(" ".join(error.messages)) from None
        user.set_password(password)
        user.save(update_fields=["password"])
        self.stdout.write(f"{username} can now log in at /accounts/login/.")

    def _read_password(self) -> str:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if password != getpass.getpass("Password (again): "):
                raise CommandError(PASSWORDS_DIFFER)
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError(EMPTY_PASSWORD)
        return password
