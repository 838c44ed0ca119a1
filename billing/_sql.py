"""The hot writes of billing as plain statements: one short INSERT run for many rows, a rollup's
upsert, one DELETE.

`bulk_create` compiles a multi-row INSERT per batch, and psycopg converts each such statement's
placeholders again (it caches only short ones); the Collector behind `QuerySet.delete()` looks
for cascades a hold or a ledger row never has. These do the same writes with one statement
text per model and database (built once), and values prepared by the model's own fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model


def _column(field: Field | None) -> str:
    assert field is not None and field.column is not None  # a concrete field has its column
    return field.column


_INSERTS: dict[tuple[type[Model], str], tuple[str, tuple[Field, ...]]] = {}


def _insert_statement(model: type[Model], connection: BaseDatabaseWrapper) -> tuple[str, tuple[Field, ...]]:
    """The single-row INSERT of `model` on this kind of database (returning the new row's key on
    PostgreSQL), and the fields it takes, in order."""
    key = (model, connection.vendor)
    if key not in _INSERTS:
        quote = connection.ops.quote_name
        fields = tuple(field for field in model._meta.concrete_fields if not field.primary_key)
        columns = ", ".join(quote(_column(field)) for field in fields)
        placeholders = ", ".join(["%s"] * len(fields))
        sql = f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders})"
        if connection.vendor == "postgresql":
            sql += f" RETURNING {quote(_column(model._meta.pk))}"
        _INSERTS[key] = sql, fields
    return _INSERTS[key]


def insert_many(model: type[Model], objects: Sequence[Model], *, using: str = DEFAULT_DB_ALIAS) -> None:
    """INSERT `objects` (unsaved) and set their primary keys, as `bulk_create` does.

    No signals, as with `bulk_create`; each value is prepared by its field (`get_db_prep_save`),
    so money stays `Decimal` and times carry their zone as the ORM would write them. PostgreSQL
    runs the statement for every row of a batch in one pipeline (psycopg's `executemany`) and
    returns each row's key; one row is a plain `execute`, because entering and leaving pipeline
    mode costs more than the round trip it saves. SQLite, in process, runs it row by row and
    reads `lastrowid`.
    """
    if not objects:
        return
    connection = connections[using]
    sql, fields = _insert_statement(model, connection)
    rows = [[field.get_db_prep_save(field.pre_save(obj, True), connection) for field in fields] for obj in objects]
    keys = []
    connection.validate_no_broken_transaction()  # as Django's own cursor does before a statement
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and len(rows) > 1:
            driver_cursor = cursor.cursor  # Django's executemany() does not pass `returning`
            with connection.wrap_database_errors:
                driver_cursor.executemany(sql, rows, returning=True)
                keys.append(driver_cursor.fetchone()[0])
                while driver_cursor.nextset():
                    keys.append(driver_cursor.fetchone()[0])
        elif connection.vendor == "postgresql":
            cursor.execute(sql, rows[0])
            keys.append(cursor.fetchone()[0])
        else:
            for row in rows:
                cursor.execute(sql, row)
                keys.append(cursor.lastrowid)
    for obj, key in zip(objects, keys, strict=True):
        obj.pk = key
        obj._state.adding = False
        obj._state.db = using


_UPSERTS: dict[tuple[type[Model], tuple[str, ...], tuple[str, ...], str], tuple[str, tuple[Field, ...]]] = {}


def _upsert_statement(
    model: type[Model], key: tuple[str, ...], sums: tuple[str, ...], connection: BaseDatabaseWrapper
) -> tuple[str, tuple[Field, ...]]:
    """`insert_or_add`'s statement for these key and sum fields on this kind of database, and
    the fields it takes, in order."""
    statement = (model, key, sums, connection.vendor)
    if statement not in _UPSERTS:
        quote = connection.ops.quote_name
        table = quote(model._meta.db_table)
        concrete = {field.name: field for field in model._meta.concrete_fields}
        fields = tuple(concrete[name] for name in (*key, *sums))
        column = {field.name: quote(_column(field)) for field in fields}
        columns = ", ".join(column[field.name] for field in fields)
        conflict = ", ".join(column[name] for name in key)
        updates = ", ".join(f"{column[name]} = {table}.{column[name]} + EXCLUDED.{column[name]}" for name in sums)
        placeholders = ", ".join(["%s"] * len(fields))
        sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT ({conflict}) DO UPDATE SET {updates}"
        _UPSERTS[statement] = sql, fields
    return _UPSERTS[statement]


def insert_or_add(model: type[Model], *, key: Mapping[str, object], sums: Mapping[str, object], using: str = DEFAULT_DB_ALIAS) -> None:
    """Add `sums` to the row of `model` that `key` names, or insert it: `INSERT ... ON CONFLICT
    (key) DO UPDATE SET x = x + EXCLUDED.x`.

    One statement, atomic on PostgreSQL and SQLite alike: concurrent writers to the same row
    queue on its lock and each adds its own amounts; there is no read-modify-write. `key` names
    the row (the fields of the model's unique constraint), `sums` what is added to it.
    """
    connection = connections[using]
    sql, fields = _upsert_statement(model, tuple(key), tuple(sums), connection)
    values = {**key, **sums}
    params = [field.get_db_prep_save(values[field.name], connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def delete_where_in(model: type[Model], field_name: str, values: Iterable[object], *, using: str = DEFAULT_DB_ALIAS) -> None:
    """DELETE the rows of `model` whose `field_name` is one of `values` (a model nothing refers to)."""
    connection = connections[using]
    field = model._meta.get_field(field_name)
    assert isinstance(field, Field)
    params = [field.get_db_prep_value(value, connection) for value in values]
    if not params:
        return
    quote = connection.ops.quote_name
    placeholders = ", ".join(["%s"] * len(params))
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {quote(model._meta.db_table)} WHERE {quote(_column(field))} IN ({placeholders})", params)
