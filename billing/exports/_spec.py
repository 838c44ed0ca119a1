"""What an export holds (`ExportSpec`), parsed from strings by `export_spec_parse`.

The command's options and the console's query parameters are the same strings, so both go through
one parser and fail with the same `ExportError` naming the argument at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final, Literal, cast, get_args
from zoneinfo import ZoneInfo

from django.contrib.auth import get_user_model

from billing.models import AccountPrice, DailyUsage, PlanPrice, Price
from billing.periods import Period, billing_day, billing_zone

Group = Literal["user", "model", "day", "month", "key"]
Format = Literal["csv", "jsonl", "json"]
Source = Literal["ledger rows", "rollups", "ledger"]

GROUPS: Final[tuple[Group, ...]] = get_args(Group)
FORMATS: Final[tuple[Format, ...]] = get_args(Format)
NO_GROUPING: Final = "none"

# Messages: `ExportError.detail`; the caller puts the argument's name in front ("--since: ...").
BAD_BOUND = "expected a date (YYYY-MM-DD) or an ISO 8601 datetime, got {value!r}."
NONEXISTENT_TIME = "{value!r} does not exist in {zone} (skipped by a clock change); give a UTC offset."
AMBIGUOUS_TIME = "{value!r} happens twice in {zone} (a clock change); give a UTC offset."
EMPTY_RANGE = "must be before until ({until}), got {since}."
UNKNOWN_USER = "no user named {value!r}."
UNKNOWN_MODEL = "no usage or price for a model named {value!r}."
UNKNOWN_GROUP = "unknown grouping {value!r} (expected none, or any of user, model, day, month, key)."
NONE_AND_GROUPS = "'none' (raw ledger rows) cannot be combined with {others}."
UNKNOWN_FORMAT = "unknown format {value!r} (expected csv, jsonl or json)."
NO_DIRECTORY = "directory {directory} does not exist."
IS_DIRECTORY = "{path} is a directory."


class ExportError(ValueError):
    """A bad export argument: `argument` names it (`since`, `group_by`, ...), `detail` says why."""

    def __init__(self, argument: str, detail: str) -> None:
        super().__init__(f"{argument}: {detail}")
        self.argument = argument
        self.detail = detail

    def for_option(self) -> str:
        """The message as the command line spells the argument: `--group-by: ...`."""
        return f"--{self.argument.replace('_', '-')}: {self.detail}"


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """Which ledger rows an export covers, how they are grouped and written.

    `since` and `until` are aware instants bounding the half-open range `[since, until)`; None is
    unbounded. `group_by` is empty for raw ledger rows. `from_ledger` aggregates grouped exports
    from the ledger even where the daily rollups would do (a cross-check of the rollups).
    """

    since: datetime | None = None
    until: datetime | None = None
    user_ids: tuple[int, ...] = ()
    models: tuple[str, ...] = ()
    group_by: tuple[Group, ...] = ()
    format: Format = "csv"
    totals: bool = False
    from_ledger: bool = False

    @property
    def source(self) -> Source:
        """Where the rows come from: see the package docstring for the rule."""
        if not self.group_by:
            return "ledger rows"
        if self.from_ledger or "key" in self.group_by:
            return "ledger"
        if not (_whole_day(self.since) and _whole_day(self.until)):
            return "ledger"
        return "rollups"


def _day_start(day: date, zone: ZoneInfo) -> datetime:
    return Period("day", day, day + timedelta(days=1), zone).start


def _whole_day(bound: datetime | None) -> bool:
    """Whether `bound` is a local midnight in BILLING_TIME_ZONE, i.e. a rollup day boundary."""
    if bound is None:
        return True
    zone = billing_zone()
    return _day_start(billing_day(bound, zone=zone), zone) == bound


def _parse_bound(argument: str, raw: str, zone: ZoneInfo) -> datetime:
    text = raw.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ExportError(argument, BAD_BOUND.format(value=raw)) from None
    if parsed.tzinfo is not None:
        return parsed
    if len(text) <= len("YYYY-MM-DD"):
        # A date: the day's first instant, which is not always 00:00 (a clock change at midnight).
        return _day_start(parsed.date(), zone)
    local = parsed.replace(tzinfo=zone)
    if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != parsed:
        raise ExportError(argument, NONEXISTENT_TIME.format(value=raw, zone=zone.key))
    if local.utcoffset() != local.replace(fold=1).utcoffset():
        raise ExportError(argument, AMBIGUOUS_TIME.format(value=raw, zone=zone.key))
    return local


def _groups(raw: Sequence[str]) -> tuple[Group, ...]:
    groups: list[Group] = []
    names = [name.strip() for name in raw]
    for name in names:
        if name != NO_GROUPING and name not in GROUPS:
            raise ExportError("group_by", UNKNOWN_GROUP.format(value=name))
    if NO_GROUPING in names and len(set(names)) > 1:
        others = ", ".join(sorted(set(names) - {NO_GROUPING}))
        raise ExportError("group_by", NONE_AND_GROUPS.format(others=others))
    for name in names:
        if name != NO_GROUPING and name not in groups:
            groups.append(cast("Group", name))
    return tuple(groups)


def _user_ids(usernames: Sequence[str]) -> tuple[int, ...]:
    if not usernames:
        return ()
    user_model = get_user_model()
    field = user_model.USERNAME_FIELD
    found = dict(user_model.objects.filter(**{f"{field}__in": usernames}).values_list(field, "pk"))
    for name in usernames:
        if name not in found:
            raise ExportError("user", UNKNOWN_USER.format(value=name))
    return tuple(sorted(set(found.values())))


def _model_known(model: str) -> bool:
    # The rollups hold every model the ledger does, in far fewer rows; each check is one indexed
    # LIMIT 1 lookup.
    return any(
        table.objects.filter(model=model).exists() for table in (DailyUsage, Price, PlanPrice, AccountPrice)
    )


def _models(models: Sequence[str]) -> tuple[str, ...]:
    for model in models:
        if not _model_known(model):
            raise ExportError("model", UNKNOWN_MODEL.format(value=model))
    return tuple(sorted(set(models)))


def export_spec_parse(
    *,
    since: str | None = None,
    until: str | None = None,
    users: Sequence[str] = (),
    models: Sequence[str] = (),
    group_by: Sequence[str] = (),
    format: str = "csv",
    totals: bool = False,
    from_ledger: bool = False,
) -> ExportSpec:
    """Validate export arguments given as strings; raise `ExportError` on the first bad one.

    Dates and datetimes without an offset are in BILLING_TIME_ZONE. Empty `since`/`until` mean
    unbounded. Checks that need no database run first.
    """
    if format not in FORMATS:
        raise ExportError("format", UNKNOWN_FORMAT.format(value=format))
    groups = _groups(group_by)
    zone = billing_zone()
    start = _parse_bound("since", since, zone) if since else None
    end = _parse_bound("until", until, zone) if until else None
    if start is not None and end is not None and start >= end:
        raise ExportError("since", EMPTY_RANGE.format(since=start.isoformat(), until=end.isoformat()))
    return ExportSpec(
        since=start,
        until=end,
        user_ids=_user_ids(users),
        models=_models(models),
        group_by=groups,
        format=format,
        totals=totals,
        from_ledger=from_ledger,
    )


def output_path_check(raw: str) -> Path:
    """The `--output` file, if it can be written: its directory exists and it is not one."""
    path = Path(raw)
    if path.is_dir():
        raise ExportError("output", IS_DIRECTORY.format(path=path))
    if not path.parent.is_dir():
        raise ExportError("output", NO_DIRECTORY.format(directory=path.parent))
    return path
