from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from billing.outbox import claim_orphans, orphan_journals


class Command(BaseCommand):
    help = (
        "Write the ledger rows kept in the journals of stopped gateway processes (LEDGER_OUTBOX_DIR; "
        "see billing/outbox.py), idempotently by request_id, and remove those journals. Journals of "
        "running processes are left to them. Running gateways do this by themselves; this is for a "
        "host whose gateway is not coming back."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        result = claim_orphans(settings.LEDGER_OUTBOX_DIR)
        self.stdout.write(
            f"{result.journals} journal(s) replayed, {result.rows} call(s) in the ledger; "
            f"{orphan_journals(settings.LEDGER_OUTBOX_DIR)} journal(s) of stopped processes left."
        )
        if result.waiting:
            raise CommandError(f"{result.waiting} journal(s) could not be written: the database failed. Run again.")
