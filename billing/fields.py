"""`ExactDecimalField`: a fixed-point decimal that is exact on PostgreSQL and on SQLite alike.

Why not Django's `DecimalField`: on SQLite it declares the column `decimal`, which has NUMERIC
affinity, so SQLite keeps `0.1000000001` as an 8-byte float (REAL), `SUM()` adds floats, the
rollup upsert's `cost_usd = cost_usd + EXCLUDED.cost_usd` adds floats, and Django reads a value
back rounded to 15 significant digits. A cost of `12345.6789012345` USD, or a day's sum of many
small costs, comes back different from what was written.

How
    PostgreSQL (and any other database): the column is `numeric(max_digits, decimal_places)`,
    exactly `DecimalField`'s, so moving a field to this class changes no schema there. (One
    difference: Django's `bulk_create` uses multi-row VALUES, not UNNEST, for a model with a
    field of a non-standard internal type.)
    SQLite: the column is a 64-bit INTEGER holding `value x 10**decimal_places` (units of 1e-10
    USD for costs, 1e-6 USD per 1M tokens for rates, 1e-4 for a plan multiplier). SQLite adds
    integers exactly, so `SUM()`, `MIN()`, `MAX()` and `a + b` in SQL stay exact, and
    `from_db_value` scales the integer back to a `Decimal`. This was chosen over keeping decimal
    text in a TEXT column, on which `SUM()` and `+` would again convert to float.

Rules, on both databases
    - A value must fit the field's places exactly: `Decimal("0.12345678901")` in a 10-place
      field is refused with `ValueError`, never rounded (PostgreSQL would round it silently).
      Rounding is `billing.money`'s job, once, with a named rounding mode.
    - A float is refused with `TypeError` (a `ValidationError` in `to_python`, for forms): money
      never passes through a float. A float read back from SQLite (a value written around the
      field, e.g. by raw SQL with a decimal literal) raises `TypeError` instead of a guess.
    - A value with more integer digits than `max_digits - decimal_places` is refused.

Bound on SQLite
    A 64-bit integer holds 9,223,372,036,854,775,807 units: USD 922,337,203.6854775807 at 10
    places. A larger value is refused on write; a `SUM()` past it fails with SQLite's "integer
    overflow" error. One case is silent: SQLite turns an `a + b` that overflows into a REAL, so a
    single rollup row (one user x model x day, `billing.services._daily_usage_add`) must stay
    under USD 922 million. PostgreSQL has no such bound beyond `max_digits`.

Queries (the internal type is `ExactDecimalField`, not `DecimalField`, so Django's SQLite
decimal machinery, a float converter and `CAST(... AS REAL)` around decimal literals, never
touches these columns)
    - `Sum`, `Min`, `Max` of one column, lookups (`cost_usd__gte=Decimal("0.5")`, scaled by the
      field) and `F(a) + F(b)` written back to a column of the same places are exact.
    - `Coalesce`, `Subquery`, `ExpressionWrapper` over these columns need
      `output_field=ExactDecimalField(...)` with the same `decimal_places`: a plain
      `DecimalField` would read the scaled integer as it is. A literal in an expression is
      `Value(0)` or `Value(amount, output_field=ExactDecimalField(...))`.
    - `Avg`, and `*` or `/` between two such columns, have no exact meaning in scaled integers:
      do that arithmetic in Python with `billing.money`.
"""

from __future__ import annotations

from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper

from billing.money import FLOAT_REFUSED

INT64_MAX = 2**63 - 1
# Scaling by a power of ten is exact for every value a column of up to 40 digits holds; a value
# with more digits than that has places beyond the column's, and trips `Inexact`.
_SCALING = Context(prec=40, traps=[Inexact, InvalidOperation])
MAX_DIGITS = 40
TOO_MANY_PLACES = "{value} has more than {places} decimal places; round it (billing.money) before storing it."
TOO_LARGE = "{value} does not fit {max_digits} digits with {places} decimal places."
SQLITE_RANGE = (
    "{value} is outside what SQLite stores exactly at {places} places "
    "(a 64-bit integer of 1e-{places} units: at most {limit})."
)
NOT_SCALED = "Expected an exact decimal from the database (on SQLite its scaled integer), got {value!r} ({kind})."
TOO_WIDE = f"An ExactDecimalField holds at most {MAX_DIGITS} digits."


class ExactDecimalField(models.DecimalField):
    """A `DecimalField` that is exact on SQLite too: a scaled 64-bit integer there (see module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.max_digits is None or self.max_digits > MAX_DIGITS:
            raise ValueError(TOO_WIDE)

    def get_internal_type(self) -> str:
        return "ExactDecimalField"

    def db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        if connection.vendor == "sqlite":
            return "bigint"
        column_type = connection.data_types["DecimalField"]
        data = self.db_type_parameters(connection)
        return column_type(data) if callable(column_type) else column_type % data

    def to_python(self, value: Any) -> Any:
        if isinstance(value, float):
            raise ValidationError(FLOAT_REFUSED.format(value=value), code="invalid")
        return super().to_python(value)

    def get_prep_value(self, value: Any) -> Any:
        if isinstance(value, float):
            raise TypeError(FLOAT_REFUSED.format(value=value))
        return super().get_prep_value(value)

    def get_db_prep_value(self, value: Any, connection: BaseDatabaseWrapper, prepared: bool = False) -> Any:
        if not prepared:
            value = self.get_prep_value(value)
        if value is None or hasattr(value, "as_sql"):
            return value
        if isinstance(value, float):
            raise TypeError(FLOAT_REFUSED.format(value=value))
        amount = value if type(value) is Decimal else self.to_python(value)
        units = self.to_units(amount)
        if connection.vendor == "sqlite":
            if not -INT64_MAX <= units <= INT64_MAX:
                limit = Decimal(INT64_MAX).scaleb(-self.decimal_places)
                raise ValueError(SQLITE_RANGE.format(value=amount, places=self.decimal_places, limit=limit))
            return units
        return connection.ops.adapt_decimalfield_value(amount, self.max_digits, self.decimal_places)

    def from_db_value(self, value: Any, expression: Any, connection: BaseDatabaseWrapper) -> Decimal | None:
        if value is None:
            return None
        if connection.vendor == "sqlite":
            if isinstance(value, int) and not isinstance(value, bool):
                return self.from_units(value)
        elif isinstance(value, Decimal):
            return value
        elif isinstance(value, int) and not isinstance(value, bool):
            return Decimal(value)
        raise TypeError(NOT_SCALED.format(value=value, kind=type(value).__name__))

    def to_units(self, amount: Decimal) -> int:
        """`amount x 10**decimal_places` as an int; ValueError if that is not exact or too large."""
        places = self.decimal_places
        if amount.adjusted() >= self.max_digits - places and not amount.is_zero():
            raise ValueError(TOO_LARGE.format(value=amount, max_digits=self.max_digits, places=places))
        try:
            scaled = amount.scaleb(places, context=_SCALING)
        except Inexact:  # more digits than any value in range has: places beyond the column's
            raise ValueError(TOO_MANY_PLACES.format(value=amount, places=places)) from None
        units = int(scaled)
        if units != scaled:
            raise ValueError(TOO_MANY_PLACES.format(value=amount, places=places))
        return units

    def from_units(self, units: int) -> Decimal:
        """The Decimal that `units` (of `10**-decimal_places`) stand for, with the column's places."""
        return Decimal(units).scaleb(-self.decimal_places, context=_SCALING)
