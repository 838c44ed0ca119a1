import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from llmgateway.services import api_key_create

DEMO_USERNAME = "admin"


class Command(BaseCommand):
    help = "Create the demo staff user and an API key on first run, printing their secrets once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default=DEMO_USERNAME, help="Staff user to create.")

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        username = options["username"]
        if user_model.objects.filter(username=username).exists():
            self.stdout.write(f"Demo user '{username}' exists; its password and key were printed on first run.")
            return
        password = secrets.token_urlsafe(12)
        user_model.objects.create_superuser(username=username, password=password, email="")
        _, raw_key = api_key_create(username=username, name="demo")
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "llmgateway demo (shown once; store them now)",
                    f"  admin:   http://127.0.0.1:8000/admin/  user '{username}'  password '{password}'",
                    f"  API key: {raw_key}",
                    "  try:    curl -N http://127.0.0.1:8000/v1/chat/completions \\",
                    f"             -H 'Authorization: Bearer {raw_key}' -H 'Content-Type: application/json' \\",
                    "             -d '{\"model\": \"sim-chat\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'",
                    "",
                ]
            )
        )
