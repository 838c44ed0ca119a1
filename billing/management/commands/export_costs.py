import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from billing.exports import (
    ExportError,
    export_spec_parse,
    output_path_check,
    usage_export,
    usage_export_count,
    write_atomically,
)


class ProgressBar:
    """`exporting  42%  420,000 / 1,000,000 rows` on one terminal line, redrawn 10 times a second."""

    INTERVAL = 0.1  # seconds between redraws

    def __init__(self, stream: OutputWrapper, total: int) -> None:
        self.stream = stream
        self.total = total
        self.drawn_at = 0.0

    def _draw(self, done: int) -> None:
        percent = 100 * done // self.total if self.total else 100
        # Plain text: the stderr wrapper would colour it as an error on a terminal.
        self.stream.write(f"\rexporting {percent:3d}%  {done:,} / {self.total:,} rows", style_func=str, ending="")
        self.stream.flush()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.drawn_at >= self.INTERVAL:
            self.drawn_at = now
            self._draw(done)

    def finish(self, done: int) -> None:
        self._draw(done)
        self.stream.write("", style_func=str, ending="\n")


class Command(BaseCommand):
    help = (
        "Export the usage ledger, as raw rows or grouped totals, as CSV, JSON Lines or JSON. "
        "Dates are calendar days in BILLING_TIME_ZONE and ranges are half-open [since, until). "
        "Output is deterministic: the same arguments on the same ledger give the same bytes. "
        "See billing/exports/__init__.py for columns, sources and formats."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since",
            help="First instant included: a date (YYYY-MM-DD, that day's start in BILLING_TIME_ZONE) "
            "or an ISO 8601 datetime (without an offset: in BILLING_TIME_ZONE). Default: the beginning.",
        )
        parser.add_argument("--until", help="First instant excluded; same forms as --since. Default: no end.")
        parser.add_argument(
            "--user", action="append", default=[], metavar="USERNAME",
            help="Only this user's usage; repeat for several users.",
        )
        parser.add_argument(
            "--model", action="append", default=[], metavar="MODEL",
            help="Only this model (the public name clients asked for); repeat for several models.",
        )
        parser.add_argument(
            "--group-by", action="append", default=[], metavar="GROUP",
            help="'none' for raw ledger rows (the default), or any of user, model, day, month, key; "
            "repeat to combine, e.g. --group-by user --group-by day. user/model/day/month with "
            "whole-day bounds come from the daily rollups; key and bounds inside a day aggregate "
            "the ledger.",
        )
        parser.add_argument("--format", default="csv", metavar="FORMAT", help="csv (default), jsonl or json.")
        parser.add_argument(
            "--output", "-o", metavar="FILE",
            help="Write to FILE, all or nothing (a temporary file beside it, renamed at the end). "
            "Default: standard output.",
        )
        parser.add_argument(
            "--totals", action="store_true",
            help="Add a totals row: the exact sums of the exported rows (equal to the database's SUM).",
        )
        parser.add_argument(
            "--from-ledger", action="store_true",
            help="Aggregate grouped exports from the ledger even where the daily rollups would do "
            "(slower; a cross-check of the rollups).",
        )
        parser.add_argument(
            "--no-progress", action="store_true",
            help="Do not show the progress bar (shown on stderr only when stderr is a terminal).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            spec = export_spec_parse(
                since=options["since"],
                until=options["until"],
                users=options["user"],
                models=options["model"],
                group_by=options["group_by"],
                format=options["format"],
                totals=options["totals"],
                from_ledger=options["from_ledger"],
            )
            path = output_path_check(options["output"]) if options["output"] else None
        except ExportError as error:
            raise CommandError(error.for_option()) from None

        bar = None
        if not options["no_progress"] and self.stderr.isatty():
            bar = ProgressBar(self.stderr, usage_export_count(spec))
        written = 0

        def progress(done: int) -> None:
            nonlocal written
            written = done
            if bar is not None:
                bar(done)

        chunks = usage_export(spec, progress=progress)
        if path is not None:
            write_atomically(path, chunks)
        else:
            for chunk in chunks:
                self.stdout.write(chunk, ending="")
            self.stdout.flush()
        if bar is not None:
            bar.finish(written)
