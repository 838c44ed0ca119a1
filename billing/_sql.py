"""The hot writes of billing as plain statements: one short INSERT run for many rows, a rollup's
upsert, one DELETE.

`bulk_create` compiles a multi-row INSERT per batch, and psycopg converts each such statement's
placeholders again (it caches only short ones); the Collector behind `QuerySet.delete()` looks
for cascades a hold or a ledger row never has. These do the same writes with one statement
text per model and database (built once), and values prepared by the model's own fields.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction
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



def delete_where(
    model: type[Model], *, equal: Mapping[str, object], at_most: Mapping[str, object], using: str = DEFAULT_DB_ALIAS
) -> None:
    """DELETE the rows of `model` whose fields equal `equal`'s values and are at most `at_most`'s
    (a model nothing refers to): `filter(a=x, b__lte=y).delete()` without the ORM's collector."""
    connection = connections[using]
    quote = connection.ops.quote_name
    conditions, params = [], []
    for names, operator in ((equal, "="), (at_most, "<=")):
        for name, value in names.items():
            field = model._meta.get_field(name)
            assert isinstance(field, Field)
            conditions.append(f"{quote(_column(field))} {operator} %s")
            params.append(field.get_db_prep_value(value, connection))
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {quote(model._meta.db_table)} WHERE {' AND '.join(conditions)}", params)

@dataclass(frozen=True, slots=True)
class RollupAdd:
    """Rows of a rollup `model` to add to (`insert_or_add`): each row maps the `key` fields and
    the `sums` fields to values. No two rows may share a key; their order is the order their
    locks are taken in."""

    model: type[Model]
    key: tuple[str, ...]
    sums: tuple[str, ...]
    rows: Sequence[Mapping[str, object]]


@dataclass(frozen=True, slots=True)
class DeleteWhereIn:
    """The rows of `model` whose `field_name` is one of `values` (`delete_where_in`)."""

    model: type[Model]
    field_name: str
    values: Sequence[object]


_TOGETHER: dict[tuple[object, ...], tuple[str, tuple[Field, ...], tuple[tuple[Field, ...], ...], Field]] = {}


def _together_statement(
    model: type[Model], rollups: Sequence[RollupAdd], delete: DeleteWhereIn, connection: BaseDatabaseWrapper
) -> tuple[str, tuple[Field, ...], tuple[tuple[Field, ...], ...], Field]:
    """`insert_add_delete`'s one PostgreSQL statement for these models and fields, and the fields
    its arrays are made of: the inserted model's, each rollup's (key then sums), the deleted one."""
    statement = (model, tuple((r.model, r.key, r.sums) for r in rollups), delete.model, delete.field_name)
    if statement not in _TOGETHER:
        quote = connection.ops.quote_name

        def array_of(field: Field) -> str:
            # The type without its modifiers (varchar[], not varchar(50)[]), as Django's own
            # UNNEST insert casts: a value is checked by its column, never cut by the cast.
            return f"%s::{str(field.db_type(connection)).split('(')[0]}[]"

        def unnest(fields: Sequence[Field]) -> str:
            return "SELECT * FROM unnest(" + ", ".join(array_of(field) for field in fields) + ")"

        insert_sql, fields = _insert_statement(model, connection)
        parts = [f"ledger AS ({insert_sql.partition(' VALUES ')[0]} {unnest(fields)} RETURNING {quote(_column(model._meta.pk))})"]
        rollup_fields = []
        for index, rollup in enumerate(rollups):
            upsert_sql, upsert_fields = _upsert_statement(rollup.model, rollup.key, rollup.sums, connection)
            head, _, rest = upsert_sql.partition(" VALUES (")
            conflict = rest.partition(")")[2]  # " ON CONFLICT (...) DO UPDATE SET ..."
            parts.append(f"rollup_{index} AS ({head} {unnest(upsert_fields)}{conflict})")
            rollup_fields.append(upsert_fields)
        deleted = delete.model._meta.get_field(delete.field_name)
        assert isinstance(deleted, Field)
        parts.append(
            f"deleted AS (DELETE FROM {quote(delete.model._meta.db_table)} "
            f"WHERE {quote(_column(deleted))} = ANY({array_of(deleted)}))"
        )
        sql = "WITH " + ", ".join(parts) + f" SELECT {quote(_column(model._meta.pk))} FROM ledger"
        _TOGETHER[statement] = sql, fields, tuple(rollup_fields), deleted
    return _TOGETHER[statement]


def insert_add_delete(
    model: type[Model],
    objects: Sequence[Model],
    *,
    rollups: Sequence[RollupAdd],
    delete: DeleteWhereIn,
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """`insert_many(model, objects)`, `insert_or_add` of every rollup row and `delete_where_in`,
    all or nothing: the ledger's write of a batch.

    PostgreSQL runs them as one statement (data-modifying `WITH` clauses over `unnest`ed
    arrays, one text whatever the batch's size): one round trip in place of one per statement
    plus BEGIN and COMMIT, and the rollup rows' locks are held for that statement alone. In
    autocommit it is its own transaction; inside one it runs under a savepoint. SQLite runs the
    statements one after another in a transaction. The objects' keys are set, as `insert_many`
    sets them.
    """
    if not objects:
        return
    connection = connections[using]
    if connection.vendor != "postgresql":
        with transaction.atomic(using=using):
            insert_many(model, objects, using=using)
            for rollup in rollups:
                for row in rollup.rows:
                    insert_or_add(
                        rollup.model,
                        key={name: row[name] for name in rollup.key},
                        sums={name: row[name] for name in rollup.sums},
                        using=using,
                    )
            delete_where_in(delete.model, delete.field_name, delete.values, using=using)
        return
    sql, fields, rollup_fields, deleted = _together_statement(model, rollups, delete, connection)
    params: list[Any] = [[field.get_db_prep_save(field.pre_save(obj, True), connection) for obj in objects] for field in fields]
    for rollup, upsert_fields in zip(rollups, rollup_fields, strict=True):
        params += [[field.get_db_prep_save(row[field.name], connection) for row in rollup.rows] for field in upsert_fields]
    params.append([deleted.get_db_prep_value(value, connection) for value in delete.values])
    # Inside the caller's transaction the statement gets a savepoint, so that a refusal leaves
    # that transaction usable, as the statements in `atomic` did; in autocommit it is atomic alone.
    savepoint = transaction.atomic(using=using) if connection.in_atomic_block else contextlib.nullcontext()
    with savepoint, connection.cursor() as cursor:
        cursor.execute(sql, params)
        # In the arrays' order, as Django's own bulk_create (INSERT ... SELECT * FROM UNNEST ...
        # RETURNING) reads them back.
        keys = [key for (key,) in cursor.fetchall()]
    for obj, key in zip(objects, keys, strict=True):
        obj.pk = key
        obj._state.adding = False
        obj._state.db = using
