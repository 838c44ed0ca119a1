from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.pricefile import PriceFileError, read_price_file
from billing.services import price_import


class Command(BaseCommand):
    help = (
        "Load catalog prices (USD per 1M tokens) from a JSON or CSV file; with no FILE, the default "
        "catalog (BILLING_DEFAULT_PRICES_FILE). Idempotent: rows already present are unchanged."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", nargs="?", default=None, help="A .json or .csv price file (see billing/pricefile.py).")
        parser.add_argument(
            "--keep-existing",
            action="store_true",
            help="Leave prices already present with other rates as they are, instead of failing.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["file"]) if options["file"] else Path(settings.BILLING_DEFAULT_PRICES_FILE)
        if not path.is_file():
            raise CommandError(f"{path}: no such file.")
        try:
            rows = read_price_file(path)
            result = price_import(rows=rows, keep_existing=options["keep_existing"])
        except (PriceFileError, ValueError) as error:
            raise CommandError(str(error)) from None
        self.stdout.write(
            f"{path.name}: {len(rows)} price(s): {result.created} added, {result.unchanged} unchanged"
            + (f", {result.kept} kept as they were" if result.kept else "")
            + "."
        )
