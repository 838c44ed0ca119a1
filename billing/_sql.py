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

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.models import Field, Model


def hot_cursor(connection: BaseDatabaseWrapper) -> CursorWrapper:
    """`connection.cursor()` for the hot statements (a batch's write, the usage read of its
    admissions): on PostgreSQL, one that sends their parameters apart from the text.

    Django's own cursors bind parameters on the client: psycopg quotes every value of a batch's
    arrays into the statement's text in Python, and the server parses and plans that text
    anew each time. With server-side binding the values travel as parameters, and psycopg
    prepares a statement it has run `prepare_threshold` times on a connection (set in settings;
    Django leaves it off, and its own cursors never prepare): these statements' texts are built
    once per model, so each connection plans them once. Django's wrapper is kept (errors as
    Django's, queries logged when they are).
    """
    if connection.vendor != "postgresql":
        return connection.cursor()
    connection.ensure_connection()
    with connection.wrap_database_errors:
        cursor: Any = psycopg.Cursor(connection.connection)  # Django's wrappers take the driver's cursor
    return connection.make_debug_cursor(cursor) if connection.queries_logged else connection.make_cursor(cursor)


def _column(field: Field | None) -> str:
    assert field is not None and field.column is not None  # a concrete field has its column
    return field.column


def _field(model: type[Model], name: str) -> Field:
    field = model._meta.get_field(name)
    assert isinstance(field, Field)  # a concrete field, not a reverse relation
    return field


def array_parameter(field: Field, connection: BaseDatabaseWrapper) -> str:
    """A placeholder for an array of `field`'s values, cast to its type without the modifiers
    (varchar[], not varchar(50)[]), as Django's own UNNEST insert casts: a value is checked by
    its column, never cut by the cast."""
    return f"%s::{str(field.db_type(connection)).split('(')[0]}[]"


@dataclass(frozen=True, slots=True)
class _Insert:
    """An INSERT of some of a model's fields, in parts: `head` names the table and columns,
    `tail` is what follows the rows (RETURNING, ON CONFLICT ...); `one_row` is the statement for
    a row of `%s` placeholders, one per field."""

    head: str
    tail: str
    fields: tuple[Field, ...]
    one_row: str

    @classmethod
    def of(cls, model: type[Model], fields: tuple[Field, ...], tail: str, connection: BaseDatabaseWrapper) -> _Insert:
        quote = connection.ops.quote_name
        head = f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(quote(_column(field)) for field in fields)})"
        return cls(head, tail, fields, f"{head} VALUES ({', '.join(['%s'] * len(fields))}){tail}")


_INSERTS: dict[tuple[type[Model], str], _Insert] = {}


def _insert_statement(model: type[Model], connection: BaseDatabaseWrapper) -> _Insert:
    """The INSERT of `model`'s fields on this kind of database (returning the new row's key on
    PostgreSQL)."""
    key = (model, connection.vendor)
    if key not in _INSERTS:
        fields = tuple(field for field in model._meta.concrete_fields if not field.primary_key)
        returning = f" RETURNING {connection.ops.quote_name(_column(model._meta.pk))}" if connection.vendor == "postgresql" else ""
        _INSERTS[key] = _Insert.of(model, fields, returning, connection)
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
    insert = _insert_statement(model, connection)
    sql = insert.one_row
    rows = [[field.get_db_prep_save(field.pre_save(obj, True), connection) for field in insert.fields] for obj in objects]
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


_UPSERTS: dict[tuple[type[Model], tuple[str, ...], tuple[str, ...], str], _Insert] = {}


def _upsert_statement(model: type[Model], key: tuple[str, ...], sums: tuple[str, ...], connection: BaseDatabaseWrapper) -> _Insert:
    """`insert_or_add`'s statement for these key and sum fields on this kind of database."""
    statement = (model, key, sums, connection.vendor)
    if statement not in _UPSERTS:
        quote = connection.ops.quote_name
        table = quote(model._meta.db_table)
        concrete = {field.name: field for field in model._meta.concrete_fields}
        fields = tuple(concrete[name] for name in (*key, *sums))
        column = {field.name: quote(_column(field)) for field in fields}
        conflict = ", ".join(column[name] for name in key)
        updates = ", ".join(f"{column[name]} = {table}.{column[name]} + EXCLUDED.{column[name]}" for name in sums)
        _UPSERTS[statement] = _Insert.of(model, fields, f" ON CONFLICT ({conflict}) DO UPDATE SET {updates}", connection)
    return _UPSERTS[statement]


def insert_or_add(model: type[Model], *, key: Mapping[str, object], sums: Mapping[str, object], using: str = DEFAULT_DB_ALIAS) -> None:
    """Add `sums` to the row of `model` that `key` names, or insert it: `INSERT ... ON CONFLICT
    (key) DO UPDATE SET x = x + EXCLUDED.x`.

    One statement, atomic on PostgreSQL and SQLite alike: concurrent writers to the same row
    queue on its lock and each adds its own amounts; there is no read-modify-write. `key` names
    the row (the fields of the model's unique constraint), `sums` what is added to it.
    """
    connection = connections[using]
    upsert = _upsert_statement(model, tuple(key), tuple(sums), connection)
    values = {**key, **sums}
    params = [field.get_db_prep_save(values[field.name], connection) for field in upsert.fields]
    with connection.cursor() as cursor:
        cursor.execute(upsert.one_row, params)


def delete_where_in(model: type[Model], field_name: str, values: Iterable[object], *, using: str = DEFAULT_DB_ALIAS) -> None:
    """DELETE the rows of `model` whose `field_name` is one of `values` (a model nothing refers to)."""
    connection = connections[using]
    field = _field(model, field_name)
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
            field = _field(model, name)
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

    @property
    def shape(self) -> tuple[object, ...]:
        return (DeleteWhereIn, self.model, self.field_name)

    def sql(self, connection: BaseDatabaseWrapper) -> str:
        quote = connection.ops.quote_name
        field = _field(self.model, self.field_name)
        return f"DELETE FROM {quote(self.model._meta.db_table)} WHERE {quote(_column(field))} = ANY({array_parameter(field, connection)})"

    def params(self, connection: BaseDatabaseWrapper) -> list[list[Any]]:
        field = _field(self.model, self.field_name)
        return [[field.get_db_prep_value(value, connection) for value in self.values]]

    def run(self, *, using: str) -> None:
        delete_where_in(self.model, self.field_name, self.values, using=using)


@dataclass(frozen=True, slots=True)
class DeleteWhereAtMost:
    """The rows of `model` whose `equal` field is the first value of one of `bounds` and whose
    `at_most` field is at most its second: `delete_where` for many pairs of values at once."""

    model: type[Model]
    equal: str
    at_most: str
    bounds: Sequence[tuple[object, object]]

    @property
    def shape(self) -> tuple[object, ...]:
        return (DeleteWhereAtMost, self.model, self.equal, self.at_most)

    def sql(self, connection: BaseDatabaseWrapper) -> str:
        quote = connection.ops.quote_name
        table = quote(self.model._meta.db_table)
        equal, at_most = _field(self.model, self.equal), _field(self.model, self.at_most)
        arrays = f"{array_parameter(equal, connection)}, {array_parameter(at_most, connection)}"
        return (
            f"DELETE FROM {table} USING unnest({arrays}) AS bound(equal, at_most)"
            f" WHERE {table}.{quote(_column(equal))} = bound.equal AND {table}.{quote(_column(at_most))} <= bound.at_most"
        )

    def params(self, connection: BaseDatabaseWrapper) -> list[list[Any]]:
        equal, at_most = _field(self.model, self.equal), _field(self.model, self.at_most)
        return [
            [equal.get_db_prep_value(value, connection) for value, _ in self.bounds],
            [at_most.get_db_prep_value(bound, connection) for _, bound in self.bounds],
        ]

    def run(self, *, using: str) -> None:
        for value, bound in self.bounds:
            delete_where(self.model, equal={self.equal: value}, at_most={self.at_most: bound}, using=using)


_TOGETHER: dict[tuple[object, ...], tuple[str, tuple[_Insert, ...]]] = {}


def _together_statement(
    model: type[Model], rollups: Sequence[RollupAdd], delete: DeleteWhereIn | DeleteWhereAtMost, connection: BaseDatabaseWrapper
) -> tuple[str, tuple[_Insert, ...]]:
    """`insert_add_delete`'s one PostgreSQL statement for these models and fields, and the
    INSERTs whose fields its arrays are made of (the inserted model's, then each rollup's); the
    DELETE's arrays come last."""
    statement = (model, tuple((r.model, r.key, r.sums) for r in rollups), delete.shape)
    if statement not in _TOGETHER:
        quote = connection.ops.quote_name

        def from_arrays(insert: _Insert) -> str:
            arrays = ", ".join(array_parameter(field, connection) for field in insert.fields)
            return f"{insert.head} SELECT * FROM unnest({arrays}){insert.tail}"

        inserts = (_insert_statement(model, connection), *(_upsert_statement(r.model, r.key, r.sums, connection) for r in rollups))
        parts = [f"written_{index} AS ({from_arrays(insert)})" for index, insert in enumerate(inserts)]
        parts.append(f"deleted AS ({delete.sql(connection)})")
        sql = "WITH " + ", ".join(parts) + f" SELECT {quote(_column(model._meta.pk))} FROM written_0"
        _TOGETHER[statement] = sql, inserts
    return _TOGETHER[statement]


def insert_add_delete(
    model: type[Model],
    objects: Sequence[Model],
    *,
    rollups: Sequence[RollupAdd],
    delete: DeleteWhereIn | DeleteWhereAtMost,
    savepoint: bool = True,
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """`insert_many(model, objects)`, `insert_or_add` of every rollup row and `delete`, all or
    nothing: the ledger's write of a batch, and the budget holds' (which has no rollups).

    PostgreSQL runs them as one statement (data-modifying `WITH` clauses over `unnest`ed
    arrays, one text whatever the batch's size): one round trip in place of one per statement
    plus BEGIN and COMMIT, and the rollup rows' locks are held for that statement alone. In
    autocommit it is its own transaction. Inside one it runs under a savepoint, so that a
    refusal leaves that transaction usable; with `savepoint=False` (two round trips fewer) a
    refusal marks the caller's transaction for rollback instead, as Django's
    `atomic(savepoint=False)` does. The DELETE sees the table as it was before the statement,
    not the rows it inserts; SQLite runs the DELETE first, then the other statements, in a
    transaction. The objects' keys are set, as `insert_many` sets them.
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        with transaction.atomic(using=using, savepoint=savepoint):
            delete.run(using=using)
            insert_many(model, objects, using=using)
            for rollup in rollups:
                for row in rollup.rows:
                    insert_or_add(
                        rollup.model,
                        key={name: row[name] for name in rollup.key},
                        sums={name: row[name] for name in rollup.sums},
                        using=using,
                    )
        return
    sql, params = _together_sql_and_params(model, objects, rollups, delete, connection)
    inside = transaction.atomic(using=using, savepoint=savepoint) if connection.in_atomic_block else contextlib.nullcontext()
    with inside, hot_cursor(connection) as cursor:
        cursor.execute(sql, params)
        _set_keys(objects, [key for (key,) in cursor.fetchall()], using)


async def ainsert_add_delete(
    model: type[Model],
    objects: Sequence[Model],
    *,
    rollups: Sequence[RollupAdd],
    delete: DeleteWhereIn | DeleteWhereAtMost,
    connection: psycopg.AsyncConnection[Any],
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """`insert_add_delete`'s one PostgreSQL statement, on a connection of the event loop
    (`infra.async_postgres`): its own transaction in autocommit, else part of the caller's (a
    refusal then fails that transaction, as with `savepoint=False`). The objects' keys are set."""
    sql, params = _together_sql_and_params(model, objects, rollups, delete, connections[using])
    cursor = await connection.execute(sql, params)
    _set_keys(objects, [key for (key,) in await cursor.fetchall()], using)


async def alock_rows[M: Model](
    model: type[M], keys: Sequence[object], *, connection: psycopg.AsyncConnection[Any], using: str = DEFAULT_DB_ALIAS
) -> list[M]:
    """The rows of `model` with these primary keys, locked (`FOR UPDATE`) in key order, as
    `select_for_update().filter(pk__in=keys).order_by("pk")` gives them, on a connection of the
    event loop inside its transaction. A row waited for is read as the transaction that held it
    left it."""
    wrapper = connections[using]
    fields = model._meta.concrete_fields
    pk = model._meta.pk
    assert pk is not None
    quote = wrapper.ops.quote_name
    table = quote(model._meta.db_table)
    sql = (
        f"SELECT {', '.join(f'{table}.{quote(_column(field))}' for field in fields)} FROM {table}"
        f" WHERE {quote(_column(pk))} = ANY({array_parameter(pk, wrapper)}) ORDER BY {quote(_column(pk))} FOR UPDATE"
    )
    cursor = await connection.execute(sql, [[pk.get_db_prep_value(key, wrapper) for key in keys]])
    converters = [[*wrapper.ops.get_db_converters(col), *col.get_db_converters(wrapper)] for col in (field.get_col(model._meta.db_table) for field in fields)]
    names = [field.attname for field in fields]
    objects = []
    for row in await cursor.fetchall():
        values = list(row)
        for position, field_converters in enumerate(converters):
            for convert in field_converters:
                values[position] = convert(values[position], fields[position], wrapper)
        objects.append(model.from_db(using, names, values))
    return objects


def _together_sql_and_params(
    model: type[Model],
    objects: Sequence[Model],
    rollups: Sequence[RollupAdd],
    delete: DeleteWhereIn | DeleteWhereAtMost,
    connection: BaseDatabaseWrapper,
) -> tuple[str, list[Any]]:
    sql, (insert, *upserts) = _together_statement(model, rollups, delete, connection)
    params: list[Any] = [[field.get_db_prep_save(field.pre_save(obj, True), connection) for obj in objects] for field in insert.fields]
    for rollup, upsert in zip(rollups, upserts, strict=True):
        params += [[field.get_db_prep_save(row[field.name], connection) for row in rollup.rows] for field in upsert.fields]
    params += delete.params(connection)
    return sql, params


def _set_keys(objects: Sequence[Model], keys: Sequence[Any], using: str) -> None:
    """Each object saved with its key: in the arrays' order, as Django's own bulk_create
    (INSERT ... SELECT * FROM UNNEST ... RETURNING) reads them back."""
    for obj, key in zip(objects, keys, strict=True):
        obj.pk = key
        obj._state.adding = False
        obj._state.db = using
