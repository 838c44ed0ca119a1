import json
from pathlib import Path
from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.exports import ExportError, output_path_check, write_atomically
from upstreams.services import upstreams_export

FORMATS = ("yaml", "json")


def document_text(document: dict[str, Any], format: str) -> str:
    if format == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=False)


class Command(BaseCommand):
    help = (
        "Write the upstream providers and public models configured in the admin as an upstreams "
        "document (YAML or JSON), which `import_upstreams` reads back unchanged. Disabled rows are "
        "left out, as the gateway leaves them out; keys are never included, only the names of the "
        "environment variables that hold them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--output", "-o", metavar="FILE",
            help="Write to FILE, all or nothing (a temporary file beside it, renamed at the end). "
            "Default: standard output.",
        )
        parser.add_argument(
            "--format", choices=FORMATS, default=None,
            help="yaml or json. Default: json if FILE ends in .json, else yaml.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path: Path | None = None
        if options["output"]:
            try:
                path = output_path_check(options["output"])
            except ExportError as error:
                raise CommandError(error.for_option()) from None
        format = options["format"] or ("json" if path is not None and path.suffix.lower() == ".json" else "yaml")
        text = document_text(upstreams_export(), format)
        if path is not None:
            write_atomically(path, [text])
        else:
            self.stdout.write(text, ending="")
