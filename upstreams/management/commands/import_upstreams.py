from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from streaming.catalog import CatalogError, read_document
from upstreams.services import upstreams_import


class Command(BaseCommand):
    help = (
        "Load upstream providers and public models from a YAML or JSON upstreams document (the "
        "format `export_upstreams` writes; see streaming/catalog.py) into the admin's configuration. "
        "The document is checked whole first and nothing is written if any part is refused; "
        "providers and models are matched by name, and each imported model's deployments become "
        "the document's."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="A .yaml, .yml or .json upstreams document.")
        parser.add_argument(
            "--replace",
            action="store_true",
            help="Also delete the providers and models the document does not list (disabled ones "
            "included). A provider still used by a deployment is an error.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check the document and print what would change, without writing anything.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["file"])
        if not path.is_file():
            raise CommandError(f"{path}: no such file.")
        try:
            document = read_document(path)
        except CatalogError as error:
            raise CommandError(str(error)) from None
        try:
            result = upstreams_import(document=document, replace=options["replace"], dry_run=options["dry_run"])
        except CatalogError as error:
            raise CommandError(f"{path.name}: {error}") from None
        for verb, labels in (("added", result.added), ("updated", result.updated), ("removed", result.removed)):
            for label in labels:
                self.stdout.write(f"{verb} {label}")
        self.stdout.write(
            f"{path.name}: {len(result.added)} added, {len(result.updated)} updated, "
            f"{len(result.removed)} removed, {result.unchanged} unchanged"
            + (" (dry run: nothing written)." if result.dry_run else ".")
        )
