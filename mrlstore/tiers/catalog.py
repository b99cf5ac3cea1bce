"""The DuckDB catalog: ids, row numbers, metadata, tombstones and the manifest. Its commit is the store's.

Tables (see storage/FORMAT.md): ``manifest(key, value)`` with JSON values, ``_items(_row, id, <metadata>)``
for live rows, ``tombstones(_row)`` for deleted ones, and the view ``items`` (``_items`` without ``_row``)
that users query. A row number below the committed watermark is either in ``_items`` or in ``tombstones``.
Ids are unique among live rows; stores of format 4 find them through the ``ids/`` cache (``IdIndex``)
instead of a DuckDB index, and every write checks its ids there.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, cast

import duckdb
import numpy as np
import pyarrow as pa

from mrlstore.errors import (
    CorruptStoreError,
    DuplicateIdError,
    ForbiddenSQLError,
    InvalidFilterError,
    MetadataError,
    MRLStoreError,
    NotAStoreError,
    OutOfMemoryError,
    StorageError,
    StoreLockedError,
)
from mrlstore.tiers.id_index import ID_DIR, IdIndex

DB_FILE = "catalog.duckdb"
APPEND_STEP_ROWS = 262_144  # rows per checkpointed transaction of a large append_tables
STAGED_KEY = "staged_write"  # manifest entry while an append_tables in steps runs: the columns before it
_WATERMARK = "SELECT CAST(value AS BIGINT) FROM manifest WHERE key = 'committed_rows'"
_ID_HASH = "hash(id)"  # DuckDB's 64-bit hash: the id cache's key (its runs record this hash of _HASH_GUARD)
_HASH_GUARD = "mrlstore id hash"
_ANY_ROWS = 4096  # rows looked up by "= ANY(list)" (point reads); more go through a join
# Serialise in a format DuckDB 1.2+ can read, so a store is not tied to the newest DuckDB release.
_FILE_CONFIG: dict[str, str | bool | int | float | list[str]] = {"storage_compatibility_version": "v1.2.0"}
# The store's own connection runs users' where= and sql() text, so it reaches nothing but its tables: no
# files, network, extensions or ATTACH, and the configuration is locked so no statement can undo that.
# (Snapshots write their copy through a separate connection: see snapshot_to.)
_SANDBOX_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    **_FILE_CONFIG,
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}  # then locked (lock_configuration), once _connect has turned DuckDB's progress bar off
# Functions refused in user SQL even though the locked engine would stop most of them: file and network
# readers, and introspection that shows paths, settings, secrets or runs SQL given as a string.
_REFUSED_FUNCTIONS = frozenset(
    {"glob", "getenv", "current_setting", "which_secret", "query", "query_table", "sniff_csv", "checkpoint",
     "force_checkpoint", "icu_calendar_names"}
)  # fmt: skip
_REFUSED_PREFIXES = ("read_", "duckdb_", "pragma_", "pg_", "parquet_", "iceberg_", "delta_", "sqlite_", "postgres_",
                     "mysql_", "json_execute", "load_", "install_")  # fmt: skip
_PATH_CHARACTERS = frozenset("/\\:.~")  # a table "name" with these is a file path DuckDB would scan
# DuckDB's words for a KeyboardInterrupt an Arrow table or stream it read raised: the error's first line ends
# with it (a query's own text, such as a cast of the string 'KeyboardInterrupt', comes quoted before more)
_ARROW_INTERRUPT = re.compile(r"\bKeyboardInterrupt:?\s*$")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Catalog:
    def __init__(
        self,
        path: Path,
        read_only: bool,
        create: bool = False,
        db_file: Path | None = None,
        fetch_ids: Callable[[], None] | None = None,
    ):
        """``fetch_ids``: what brings the id cache's runs into ``path/ids`` before its first load (a version on
        object storage downloads them on first use)."""
        self.path = Path(db_file) if db_file is not None else Path(path) / DB_FILE
        self._folder = Path(path)
        self._id_dir = self._folder / ID_DIR
        self._id_index: IdIndex | None = None  # loaded on first use
        self._fetch_ids = fetch_ids
        # a local reader's runs are the live store's: a later writer rewrites them from its own live rows,
        # without those it deleted since this reader's version (a published version's runs are its own)
        self._runs_may_lack_rows = read_only and fetch_ids is None
        self._fetch_lock = threading.Lock()
        self._unique_ids: bool | None = None  # DuckDB's own unique index on id (formats 1-3): no cache then
        self.read_only = read_only
        self._lock = _StatementLock()
        if not create and not self.path.exists():
            raise NotAStoreError(f"{path} is not an mrlstore store (no {DB_FILE})")
        self._hidden = False  # _items is shadowed by a view of the committed rows (a reader after a dead write)
        try:
            with self._lock:  # a Ctrl-C in the open is a KeyboardInterrupt, as in any statement (_StatementLock)
                self._con = self._connect()
                if read_only:
                    self._hide_uncommitted()
        except BaseException:
            _close_quietly(self._lock.con)
            raise
        self._columns: dict[str, str] | None = None
        self._batch_registered = False  # "_batch" is registered on the connection (unregistered after a rollback)
        self._checked_filters: set[str] = set()  # where= expressions already parsed and found read-only

    @property
    def _con(self) -> duckdb.DuckDBPyConnection:
        return cast(duckdb.DuckDBPyConnection, self._lock.con)

    @_con.setter
    def _con(self, con: duckdb.DuckDBPyConnection) -> None:
        self._lock.con = con

    def _connect(self) -> duckdb.DuckDBPyConnection:
        try:
            con = duckdb.connect(str(self.path), read_only=self.read_only, config=_SANDBOX_CONFIG)
        except duckdb.IOException as e:
            msg = str(e)
            if "lock" in msg.lower():
                raise StoreLockedError(
                    f"{self._folder} is open for writing by another process; DuckDB allows one process per file "
                    f"(close the writer, or read a copy made with Store.snapshot). DuckDB said: {msg}"
                ) from None
            raise CorruptStoreError(f"cannot open catalog {self.path}: {msg}") from None
        except duckdb.Error as e:
            raise CorruptStoreError(f"cannot open catalog {self.path}: {e}") from None
        try:  # a library prints nothing (`mrlstore sql` printed DuckDB's progress bar to stdout); then locked
            con.execute("SET enable_progress_bar = false")
            con.execute("SET lock_configuration = true")
        except duckdb.Error:  # another connection of this process to the file locked the shared instance
            if not _locked(con):
                con.close()
                raise
        except BaseException:
            con.close()
            raise
        return con

    def close(self) -> None:
        with self._lock:
            self._forget_ids()
            self._con.close()

    def _hide_uncommitted(self) -> None:
        """Past a write in steps whose writer died, show this reader the committed rows and columns only: a
        temporary view ``_items`` shadows the table for its connection alone (the next writer's open deletes
        the rest; no writer can open while this reader has the file). A query that names the table with its
        database still reaches the table itself."""
        try:
            mark = self._con.execute("SELECT value FROM manifest WHERE key = ?", [STAGED_KEY]).fetchall()
        except duckdb.Error:
            return  # not a catalog: manifest() says so to the caller
        if not mark:
            return
        try:
            kept = ", ".join(_quote(name) for name in ["_row", "id", *json.loads(mark[0][0])["columns"]])
            table = f"{_quote(self._con.execute('SELECT current_database()').fetchall()[0][0])}.main._items"
            self._con.execute(f"CREATE TEMP VIEW _items AS SELECT {kept} FROM {table} WHERE _row < ({_WATERMARK})")
        except (duckdb.Error, TypeError, ValueError, KeyError) as e:
            self._con.close()
            raise CorruptStoreError(f"catalog {self.path} marks an unreadable staged write: {e}") from None
        self._hidden = True

    # -- schema and manifest -----------------------------------------------------------------------
    def create_schema(self, manifest: dict[str, Any]) -> None:
        with self._lock:
            con = self._con
            with self._transaction():
                con.execute("CREATE TABLE manifest (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
                con.execute("CREATE TABLE _items (_row BIGINT PRIMARY KEY, id VARCHAR NOT NULL)")
                con.execute("CREATE TABLE tombstones (_row BIGINT PRIMARY KEY)")
                self._refresh_view()
                rows = [(k, json.dumps(v)) for k, v in manifest.items()]
                con.executemany("INSERT INTO manifest VALUES (?, ?)", rows)

    def manifest(self) -> dict[str, Any]:
        with self._lock:
            try:
                rows = self._con.execute("SELECT key, value FROM manifest").fetchall()
            except duckdb.CatalogException:
                raise NotAStoreError(f"{self.path} is a DuckDB file but not an mrlstore catalog") from None
            except duckdb.Error as e:
                raise CorruptStoreError(f"cannot read catalog {self.path}: {_first_line(e)}") from None
        try:
            return {k: json.loads(v) for k, v in rows}
        except (TypeError, ValueError) as e:
            raise CorruptStoreError(f"catalog {self.path} has an unreadable manifest: {e}") from None

    def _refresh_view(self) -> None:
        self._con.execute("CREATE OR REPLACE VIEW items AS SELECT * EXCLUDE (_row) FROM _items")
        self._columns = None

    def columns(self) -> dict[str, str]:
        """Metadata columns and their DuckDB types, in table order."""
        with self._lock:
            if self._columns is None:
                rows = self._con.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = '_items' AND table_schema = 'main' AND table_catalog = "
                    + ("'temp'" if self._hidden else "current_database()")
                    + " ORDER BY ordinal_position"
                ).fetchall()
                self._columns = {n: t for n, t in rows if n not in ("_row", "id")}
            return dict(self._columns)

    def add_columns(self, columns: dict[str, str]) -> None:
        """The metadata columns of ``columns`` (name -> DuckDB type) the store lacks, empty (a compaction
        carries every column of the old store, also those no live row fills)."""
        with self._lock, self._transaction():
            existing = self.columns()
            for name, dtype in columns.items():
                if name not in existing:
                    self._con.execute(f"ALTER TABLE _items ADD COLUMN {_quote(name)} {dtype}")
            self._refresh_view()

    # -- reads -------------------------------------------------------------------------------------
    def live_items(self) -> tuple[np.ndarray, pa.Table]:
        """Every live row: (row numbers ascending, their id and metadata columns)."""
        with self._lock, _corruption_as_error(self.path):
            t = _arrow(self._con, f"SELECT * FROM _items WHERE _row < ({_WATERMARK}) ORDER BY _row")
        return t.column("_row").to_numpy().astype(np.int64), t.drop_columns(["_row"])

    def live_count(self) -> int:
        with self._lock, _corruption_as_error(self.path):
            return int(self._con.execute(f"SELECT count(*) FROM _items WHERE _row < ({_WATERMARK})").fetchall()[0][0])

    def tombstones(self) -> np.ndarray:
        with self._lock, _corruption_as_error(self.path):
            t = self._con.execute("SELECT _row FROM tombstones ORDER BY _row").fetchnumpy()
        return np.asarray(t["_row"], dtype=np.int64)

    def memory_held(self) -> dict[str, int]:
        """Bytes DuckDB's own accounting says it holds, by tag (``duckdb_memory()``): not the process's memory,
        which can be far more (after one large transaction, 10 MiB here against 346 MiB)."""
        with self._lock:
            rows = self._con.execute("SELECT tag, memory_usage_bytes FROM duckdb_memory() WHERE memory_usage_bytes > 0")
            return {str(tag): int(held) for tag, held in rows.fetchall()}

    def rows_of(self, ids: list[str]) -> dict[str, int]:
        """The row of each of ``ids`` that is in ``_items``."""
        if not ids:
            return {}
        self._fetch_id_runs()
        with self._lock, _corruption_as_error(self.path):
            return self._find(ids)

    def repeated_ids(self, limit: int = 5) -> list[str]:
        """Up to ``limit`` ids stored at more than one row below the watermark (none in a consistent store)."""
        query = f"SELECT id FROM _items WHERE _row < ({_WATERMARK}) GROUP BY id HAVING count(*) > 1 LIMIT ?"
        with self._lock, _corruption_as_error(self.path):
            return [i for (i,) in self._con.execute(query, [limit]).fetchall()]

    def filter_rows(self, where: str) -> np.ndarray:
        """Sorted rows of ``_items`` matching ``where`` (checked once per distinct expression)."""
        if not isinstance(where, str) or not where.strip():
            raise InvalidFilterError(f"where= must be a non-empty SQL expression string, got {where!r}")
        sql = f"SELECT _row FROM _items WHERE (\n{where}\n)"  # own lines: a trailing -- comment stays inside
        with self._lock:
            if where not in self._checked_filters:
                try:
                    duckdb.SQLExpression(where)  # parses as one expression, or it is no filter
                except duckdb.Error as e:
                    raise InvalidFilterError(f"where={where!r} is not one SQL expression: {_first_line(e)}") from None
                self._check_single_select(sql, what="where=", shown=where)
                if len(self._checked_filters) > 1024:
                    self._checked_filters.clear()
                self._checked_filters.add(where)
            try:
                res = self._read_only(lambda: self._con.execute(sql).fetchnumpy())
            except duckdb.PermissionException as e:
                raise ForbiddenSQLError(f"where={where!r} refused: {_first_line(e)}") from None
            except (duckdb.BinderException, duckdb.CatalogException) as e:
                raise InvalidFilterError(
                    f"where={where!r} does not bind: {_first_line(e)}. Metadata columns: "
                    f"{', '.join(['id', *self.columns()])}"
                ) from None
            except duckdb.OutOfMemoryException as e:
                raise _out_of_memory("filtering", self.path, e) from None
            except duckdb.Error as e:
                raise InvalidFilterError(f"where={where!r} failed: {_first_line(e)}") from None
        return np.sort(np.asarray(res["_row"], dtype=np.int64))

    def items_for_ids(self, ids: list[str]) -> pa.Table:
        """Rows of ``_items`` (``_row``, id, metadata) for ``ids``, in the order given; unknown ids absent."""
        if ids:
            self._fetch_id_runs()
        with self._lock, _corruption_as_error(self.path):
            found = self._find(ids) if ids else {}
            positions = [pos for pos, i in enumerate(ids) if i in found]
            rows = [found[ids[pos]] for pos in positions]
            self._con.register("_rows_in", pa.table({"_row": pa.array(rows, pa.int64()), "_pos": positions}))
            try:
                return _arrow(self._con, "SELECT i.* FROM _items i JOIN _rows_in q ON i._row = q._row ORDER BY q._pos")
            finally:
                self._con.unregister("_rows_in")

    # -- the id cache (IdIndex): candidates by hash, each checked here ---------------------------------
    def _fetch_id_runs(self) -> None:
        """A remote version's id runs, downloaded before a lookup takes the catalog's lock, so that other
        threads' filters and sql() go on meanwhile (one download at a time; ``_ids`` fetches them itself if
        anything else loads the cache first)."""
        if self._fetch_ids is None:
            return
        with self._fetch_lock:
            if self._fetch_ids is not None:
                self._fetch_ids()
                self._fetch_ids = None

    def _ids(self) -> IdIndex | None:
        """The id cache, loaded on first use; None for a store whose DuckDB index on id finds and checks ids
        (formats 1-3: a release that knows no cache may write them, so it could not be trusted)."""
        if self._unique_ids is None:
            query = ("SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database() "
                     "AND table_name = '_items' AND constraint_type = 'UNIQUE'")  # fmt: skip
            self._unique_ids = bool(self._con.execute(query).fetchall()[0][0])
        if self._id_index is None and not self._unique_ids:
            self._fetch_id_runs()
            # the hash of the guard text and the row numbering: runs of another hash or generation are not used
            generation = self.manifest().get("generation", 0)
            guard = self._con.execute("SELECT hash(?)", [f"{_HASH_GUARD} {generation}"]).fetchall()[0][0]
            index = IdIndex(self._id_dir, int(guard), self._read_pairs, writable=not self.read_only)
            index.load(self.committed_rows())
            self._id_index = index
        return self._id_index

    def copy_id_runs(self, dest: Path) -> list[Path]:
        """The id cache's runs of the committed rows into ``dest`` (none for formats 1-3), for a copy of this
        catalog made at the same point (``snapshot_to``, under the store's write lock)."""
        with self._lock, _corruption_as_error(self.path):
            index = self._ids()
            return [] if index is None else index.copy_runs(dest, self.committed_rows())

    def _forget_ids(self) -> None:
        """After a failed write (or a discarded one): the next use reloads the cache from disk and catalog."""
        if self._id_index is not None:
            self._id_index.close()
            self._id_index = None

    def _read_pairs(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._con.execute(f"SELECT {_ID_HASH} AS h, _row FROM _items WHERE _row >= ? AND _row < ?", [lo, hi])
        pairs = got.fetchnumpy()
        return np.asarray(pairs["h"], dtype=np.uint64), np.asarray(pairs["_row"], dtype=np.int64)

    def _hashes(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        self._con.register("_hash_in", pa.table({"id": ids}))
        try:
            got = self._con.execute(f"SELECT {_ID_HASH} AS h FROM _hash_in").fetchnumpy()
        finally:
            self._con.unregister("_hash_in")
        return np.asarray(got["h"], dtype=np.uint64)

    def _find(self, ids: list[str]) -> dict[str, int]:
        """The row of each of ``ids`` in ``_items``: the cache's candidates, checked against the catalog."""
        index = self._ids()
        if index is None:
            return self._join_ids(ids, 0)
        positions, rows = index.candidates(self._hashes(pa.array(ids, pa.string())))
        stored = self._ids_at(rows)
        found = {ids[p]: r for p, r in zip(positions.tolist(), rows.tolist()) if stored.get(r) == ids[p]}
        if index.tail_in_catalog:  # a reader whose cache misses many rows: those are joined here
            found.update(self._join_ids(ids, index.covered))
        if self._runs_may_lack_rows and len(found) < len(set(ids)):
            found.update(self._join_ids([i for i in dict.fromkeys(ids) if i not in found], 0))
        return found

    def _ids_at(self, rows: np.ndarray) -> dict[int, str]:
        """The id at each of ``rows`` that is in ``_items``."""
        rows = np.unique(rows)
        if not len(rows):
            return {}
        if len(rows) <= _ANY_ROWS:  # point reads of the _row index
            got = self._con.execute("SELECT _row, id FROM _items WHERE _row = ANY(?)", [rows.tolist()]).fetchall()
            return dict(got)
        self._con.register("_rows_in", pa.table({"_row": rows}))
        try:
            return dict(self._con.execute("SELECT i._row, i.id FROM _items i JOIN _rows_in q USING (_row)").fetchall())
        finally:
            self._con.unregister("_rows_in")

    def _join_ids(self, ids: list[str], from_row: int) -> dict[str, int]:
        self._con.register("_ids_in", pa.table({"id": pa.array(ids, pa.string())}))
        try:
            query = "SELECT i.id, i._row FROM _items i JOIN _ids_in q ON i.id = q.id WHERE i._row >= ?"
            return dict(self._con.execute(query, [from_row]).fetchall())
        finally:
            self._con.unregister("_ids_in")

    def _refuse_repeats(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        """Inside a write's transaction, after its rows went into ``_items``: DuplicateIdError if an id of
        ``rows`` (``hashes``: their ids' hashes) is at another row too; then the cache takes them."""
        index = self._ids()
        if index is None:
            return  # DuckDB's unique index refuses them
        positions, others = index.candidates(hashes)
        apart = rows[positions] != others
        own, others = rows[positions][apart], others[apart]
        _, group, sizes = np.unique(hashes, return_inverse=True, return_counts=True)
        sharing = rows[sizes[group] > 1]  # rows of this write whose hash another of its rows has
        if len(own) or len(sharing):
            stored = self._ids_at(np.concatenate([own, others, sharing]))
            repeated = {
                stored[a] for a, b in zip(own.tolist(), others.tolist()) if a in stored and stored.get(b) == stored[a]
            }
            within = Counter(stored[r] for r in sharing.tolist() if r in stored)
            repeated |= {i for i, times in within.items() if times > 1}
            if repeated:
                raise DuplicateIdError(
                    f"{len(repeated)} id(s) already in the store or repeated, e.g. {sorted(repeated)[:5]}"
                )
        index.add(hashes, rows)

    def sql(self, query: str) -> pa.Table:
        with self._lock:
            self._check_single_select(query, what="sql()", shown=query)
            try:
                return self._read_only(lambda: _arrow(self._con, query))
            except duckdb.PermissionException as e:
                raise ForbiddenSQLError(f"sql() refused: {_first_line(e)}") from None
            except duckdb.OutOfMemoryException as e:
                raise _out_of_memory("running sql() on", self.path, e) from None
            except duckdb.Error as e:
                raise InvalidFilterError(f"query failed: {_first_line(e)}") from None
            except RuntimeError as e:
                raise _interrupt_or(e) from None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed, or rolled back on any exception (DuckDB may have aborted it
        already, after an I/O error); a file-system failure becomes a StorageError."""
        con = self._con
        try:  # begin inside: an interrupt right after it must still roll back (the handle was left unusable)
            con.begin()
            yield
            try:
                con.commit()
            except duckdb.OutOfMemoryException:
                raise
            except duckdb.Error as e:  # the commit itself: its WAL could not be written
                raise StorageError(f"cannot commit to the catalog {self.path}: {_first_line(e)}") from None
        except BaseException as e:
            _roll_back(con)
            self._columns = None
            if isinstance(e, duckdb.IOException):
                raise StorageError(f"cannot write the catalog {self.path}: {_first_line(e)}") from None
            if isinstance(e, duckdb.OutOfMemoryException):
                raise _out_of_memory("writing", self.path, e) from None
            raise

    def stopped(self) -> bool:
        """Whether DuckDB has invalidated the catalog's database after a fatal error (a checkpoint that found
        the disk full): it refuses every statement until the store is opened again."""
        with self._lock:
            try:
                self._con.execute("SELECT 1").fetchall()
            except duckdb.FatalException:
                return True
            except duckdb.Error:
                pass
            return False

    def _read_only(self, run: Callable[[], T]) -> T:
        """Run user SQL in a transaction that is always rolled back: a SELECT may still hide a write
        (a data-modifying CTE), and none may reach the catalog except through the Store API."""
        if self.read_only:
            return run()
        try:
            self._con.begin()
            return run()
        finally:
            _roll_back(self._con)

    def _check_single_select(self, sql: str, what: str, shown: str) -> None:
        if not isinstance(sql, str):
            raise InvalidFilterError(f"{what} takes SQL text, got {type(sql).__name__}")
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as e:
            raise InvalidFilterError(f"{what} is not valid SQL: {_first_line(e)}") from None
        allowed = f"{what} accepts one read-only SELECT over the store's tables (writes go through the Store API)"
        if len(statements) > 1:  # a second statement is how text smuggles in a write
            raise ForbiddenSQLError(f"{allowed}; got {len(statements)} statements: {shown!r}")
        if not statements:
            raise InvalidFilterError(f"{allowed}; got no statement: {shown!r}")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            error = ForbiddenSQLError if kind != duckdb.StatementType.INVALID else InvalidFilterError
            raise error(f"{what} refused the {kind.name} statement {shown!r}: {allowed}")
        # DuckDB calls "WITH d AS (DELETE ... RETURNING ...) SELECT ..." a SELECT: inspect its parse tree.
        tree = json.loads(self._con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
        if tree.get("error"):
            raise InvalidFilterError(f"{allowed}: {shown!r}")
        nodes, functions, tables = _parse_tree_names(tree)
        if nodes - _READ_NODES:
            raise ForbiddenSQLError(f"{what} refused a write hidden in a SELECT: {allowed}: {shown!r}")
        # a bare table name may resolve to a table function, or be a file path DuckDB would scan
        refused = sorted(
            name
            for name in functions | tables
            if name in _REFUSED_FUNCTIONS
            or name.startswith(_REFUSED_PREFIXES)
            or (name in tables and not _PATH_CHARACTERS.isdisjoint(name))
        )
        if refused:
            raise ForbiddenSQLError(
                f"{what} refused {', '.join(f + '()' for f in refused)}: filters and SQL reach only the store's "
                f"tables (items), never files, the network, extensions or settings: {shown!r}"
            )

    def check_metadata(self, metadata: pa.Table) -> None:
        """Raise MetadataError if ``metadata`` cannot be stored in the existing columns (no writes)."""
        existing = self.columns()
        shared = [c for c in metadata.column_names if c in existing]
        if not shared:
            return
        with self._lock:
            self._con.register("_meta_check", metadata.select(shared))
            try:
                described = self._con.execute("DESCRIBE SELECT * FROM _meta_check").fetchall()
                given = {name: dtype for name, dtype, *_ in described}
                casts = ", ".join(_refused_cast(_quote(c), existing[c], given[c]) for c in shared)
                bad = self._con.execute(f"SELECT {casts} FROM _meta_check").fetchall()
            except duckdb.Error as e:
                raise MetadataError(f"metadata does not fit the store's column types: {_first_line(e)}") from None
            finally:
                with suppress(duckdb.Error):  # in an aborted transaction: the next register replaces it
                    self._con.unregister("_meta_check")
        for row_i, flags in enumerate(bad):
            for col, failed in zip(shared, flags):
                if failed:
                    value = metadata.column(col)[row_i].as_py()
                    raise MetadataError(
                        f"metadata[{row_i}][{col!r}] = {value!r} does not fit column {col!r} of type "
                        f"{existing[col]} (or would change when stored there); a column's type is set by the first "
                        "values written to it: write its first values in the type you need (2.0 for a float column)"
                    )

    def snapshot_to(self, dest: Path) -> None:
        """Copy the whole catalog into a new DuckDB file at ``dest`` (a consistent point in time: every write
        holds the lock). The store's own connection may touch no other file, so the copy is written by a
        connection of its own, table by table through Arrow, after the same DDL."""
        with self._lock:
            try:
                tables = self._con.execute(
                    "SELECT table_name, sql FROM duckdb_tables() WHERE database_name = current_database() "
                    "AND schema_name = 'main' ORDER BY table_oid"
                ).fetchall()
                views = self._con.execute(
                    "SELECT sql FROM duckdb_views() WHERE database_name = current_database() AND NOT internal "
                    "AND schema_name = 'main' ORDER BY view_oid"
                ).fetchall()
                self._copy_to(dest, tables, views)
            except (duckdb.Error, RuntimeError) as e:
                raise _copy_error(e, self.path, dest) from None

    def _copy_to(self, dest: Path, tables: list[Any], views: list[Any]) -> None:
        """The tables' DDL and rows, then the views, into a new database at ``dest`` (the lock is held)."""
        copy = duckdb.connect(str(dest), config=_FILE_CONFIG)
        try:
            copy.begin()
            for name, ddl in tables:
                copy.execute(ddl)
                copy.register("_source", _arrow_reader(self._con, f"SELECT * FROM {_quote(name)}"))
                copy.execute(f"INSERT INTO {_quote(name)} SELECT * FROM _source")
                copy.unregister("_source")  # not on failure: in an aborted transaction it hid the error
            for (ddl,) in views:
                copy.execute(ddl)
            copy.commit()
            copy.execute("CHECKPOINT")
        finally:
            copy.close()

    # -- writes (each one transaction: the commit point) -------------------------------------------
    def commit_rows(
        self,
        first_row: int,
        ids: list[str],
        metadata: pa.Table | None,
        new_watermark: int,
        replace_rows: np.ndarray | None = None,
    ) -> pa.Table:
        """Record ``ids`` at rows ``first_row..`` (tombstoning ``replace_rows``) and the new watermark.
        Returns the new rows' id and metadata columns exactly as stored (every column of the table)."""
        n = len(ids)
        batch = pa.table(
            {"_row": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)), "id": pa.array(ids, pa.string())}
        )
        if metadata is not None:
            for name in metadata.column_names:
                batch = batch.append_column(name, metadata.column(name))
        with self._lock:
            con = self._con
            # Registrations stay outside the transaction: after a failed statement DuckDB refuses
            # everything but ROLLBACK, and an unregister there would hide the real error.
            _register_metadata(con, "_batch", batch)
            if replace_rows is not None and len(replace_rows):
                con.register("_dead", pa.table({"_row": pa.array(np.asarray(replace_rows, dtype=np.int64))}))
            try:
                hashes = self._hashes(batch.column("id")) if self._ids() is not None else np.empty(0, np.uint64)
                stored = self._commit_rows_txn(
                    metadata, replace_rows, new_watermark, batch.column("_row").to_numpy(), hashes
                )
            except BaseException:
                self._forget_ids()
                raise
            finally:
                with suppress(duckdb.Error):  # a failed commit can leave DuckDB refusing even this: not its error
                    con.unregister("_batch")
                    if replace_rows is not None and len(replace_rows):
                        con.unregister("_dead")
            if self._id_index is not None:
                self._id_index.flush()
        return stored.drop_columns(["_row"])

    def append_tables(
        self,
        first_row: int,
        tables: Iterable[pa.Table],
        new_watermark: int,
        step_rows: int | None = None,
        columns: pa.Table | None = None,
    ) -> None:
        """Record rows ``first_row..new_watermark`` from ``tables`` (``id`` and metadata columns, taken one at
        a time): all of them visible at once, or none. DuckDB holds committed rows and their unique index
        entries in memory until a checkpoint writes them out, so a write of more than ``step_rows`` rows
        (default APPEND_STEP_ROWS) goes in several transactions of about that many, each checkpointed: rows
        past the watermark belong to no committed state, the first transaction marks the write in the
        manifest (a failure here, or the next writer's open, removes its rows and columns:
        ``discard_staged``), and the last one moves the watermark. Each step refuses ids already stored or
        repeated in the write (``_refuse_repeats``; formats 1-3: DuckDB's unique index). ``columns`` (an
        empty table): metadata columns to make first, in these types."""
        before, row, tables = list(self.columns()), first_row, iter(tables)
        step_rows, marked = step_rows or APPEND_STEP_ROWS, False
        with self._lock:
            try:
                while True:
                    with _insert_errors("an id is already in the store or repeated"), self._transaction():
                        if columns is not None and row == first_row:
                            self._add_columns(columns)
                        row, done = self._insert_step(row, tables, step_rows)
                        if done:
                            if row != new_watermark:
                                raise CorruptStoreError(
                                    f"tables of {row - first_row} rows for {new_watermark - first_row}"
                                )
                            self._set_watermark(new_watermark)
                        if done == marked:  # the first of several steps marks the write, the last unmarks it
                            self._put_manifest(STAGED_KEY, None if done else {"columns": before})
                            marked = not done
                    if not done:
                        self._checkpoint()
                        self._release_buffers()
                    if self._id_index is not None:  # its runs apart from the committed ones until the end
                        self._id_index.flush(keep_below=0 if done else first_row)
                    if done:
                        return
            except BaseException:
                self._undo_steps(row > first_row)
                raise

    def _insert_step(self, row: int, tables: Iterator[pa.Table], step_rows: int) -> tuple[int, bool]:
        """Insert tables at rows ``row..`` until ``step_rows`` rows or the end: (next row, whether at the end)."""
        start, hashes = row, []
        done = True
        for table in tables:
            if table.num_columns > 1:
                self._add_columns(table.drop_columns(["id"]))
                self.check_metadata(table.drop_columns(["id"]))  # as every add does: no silent change
            rows = pa.array(np.arange(row, row + table.num_rows, dtype=np.int64))
            _register_metadata(self._con, "_batch", table.add_column(0, "_row", rows))
            self._batch_registered = True
            self._con.execute("INSERT INTO _items BY NAME SELECT * FROM _batch")
            self._unregister_batch()
            if self._ids() is not None:
                hashes.append(self._hashes(table.column("id")))
            row += table.num_rows
            if row - start >= step_rows:
                done = False
                break
        if hashes:
            self._refuse_repeats(np.concatenate(hashes), np.arange(start, row, dtype=np.int64))
        return row, done

    def _undo_steps(self, any_committed: bool) -> None:
        """After a failed step: its batch unregistered (after the rollback: DuckDB refuses all but ROLLBACK
        after a failure) and the earlier steps' rows removed. Never raises over the step's own error: after a
        fatal one (a failed checkpoint) DuckDB refuses everything, and the next writer's open removes them."""
        self._forget_ids()
        try:
            self._unregister_batch()
            if any_committed:
                self.discard_staged()
        except (duckdb.Error, MRLStoreError):
            pass

    def _release_buffers(self) -> None:
        """Between steps of a long write, a new connection: DuckDB keeps every block a connection wrote in its
        buffer pool until its memory limit (80% of RAM) forces them out, and frees them when the connection
        closes. The writer lock keeps mrlstore processes away meanwhile, not other DuckDB clients: a few tries,
        then StorageError, and the catalog refuses every later call the same way (the store must be reopened;
        the write's steps go at the next writer's open)."""
        self._con.close()
        for wait in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0):
            time.sleep(wait)
            try:
                self._con = self._connect()
                return
            except MRLStoreError as e:
                failure = e
        message = f"cannot connect to the catalog {self.path} again (reopen the store to go on): {failure}"
        self._con = cast(duckdb.DuckDBPyConnection, _Unusable(message))
        raise StorageError(message)

    def _checkpoint(self) -> None:
        """Write committed changes into the file, which lets DuckDB free the memory that holds them."""
        try:
            self._con.execute("CHECKPOINT")
        except duckdb.Error as e:
            raise StorageError(
                f"cannot checkpoint the catalog {self.path} (reopen the store to go on): {_first_line(e)}"
            ) from None

    def _unregister_batch(self) -> None:
        if self._batch_registered:
            self._con.unregister("_batch")
            self._batch_registered = False

    def discard_staged(self) -> None:
        """Remove the rows and the metadata columns of a write in steps that never moved the watermark (a
        writer's open, or the write's own failure); no-op when there is none."""
        with self._lock:
            manifest = self.manifest()
            entry = manifest.get(STAGED_KEY)
            if entry is None:
                return
            with self._transaction():
                self._con.execute("DELETE FROM _items WHERE _row >= ?", [int(manifest["committed_rows"])])
                for name in set(self.columns()) - set(entry["columns"]):
                    self._con.execute(f"ALTER TABLE _items DROP COLUMN {_quote(name)}")
                self._put_manifest(STAGED_KEY, None)
                self._refresh_view()
            self._forget_ids()  # its rows' pairs go at the next load

    def _commit_rows_txn(
        self,
        metadata: pa.Table | None,
        replace_rows: np.ndarray | None,
        new_watermark: int,
        rows: np.ndarray,
        hashes: np.ndarray,
    ) -> pa.Table:
        with _insert_errors("an id is already in the store"), self._transaction():
            if metadata is not None:
                self._add_columns(metadata)
            if replace_rows is not None and len(replace_rows):
                self._tombstone_registered()
            stored = _arrow(self._con, "INSERT INTO _items BY NAME SELECT * FROM _batch RETURNING *")
            if len(hashes):
                self._refuse_repeats(hashes, rows)
            self._set_watermark(new_watermark)
        return stored.sort_by("_row")

    def drop_id_index(self, format_version: int) -> None:
        """Make ``_items`` again without DuckDB's unique index on id (formats 1-3), in one transaction that
        also sets ``format_version``: the ids' cache takes over at the next lookup."""
        with self._lock:
            typed = [f"{_quote(name)} {dtype}" for name, dtype in self.columns().items()]
            with self._transaction():
                self._con.execute("DROP VIEW items")
                self._con.execute(
                    f"CREATE TABLE _items_new ({', '.join(['_row BIGINT PRIMARY KEY', 'id VARCHAR NOT NULL', *typed])})"
                )
                self._con.execute("INSERT INTO _items_new SELECT * FROM _items")
                self._con.execute("DROP TABLE _items")
                self._con.execute("ALTER TABLE _items_new RENAME TO _items")
                self._refresh_view()
                self._put_manifest("format_version", format_version)
            self._checkpoint()
            self._unique_ids = None
            self._forget_ids()

    def delete_rows(self, rows: np.ndarray) -> None:
        with self._lock:
            con = self._con
            con.register("_dead", pa.table({"_row": pa.array(np.asarray(rows, dtype=np.int64))}))
            try:
                with self._transaction():
                    self._tombstone_registered()
            finally:
                con.unregister("_dead")

    def _tombstone_registered(self) -> None:
        """Move the rows of the registered ``_dead`` table from ``_items`` to ``tombstones``."""
        self._con.execute("DELETE FROM _items WHERE _row IN (SELECT _row FROM _dead)")
        self._con.execute("INSERT INTO tombstones SELECT _row FROM _dead")

    def rows_outside(self, watermark: int) -> int:
        """How many catalog rows lie outside ``[0, watermark)`` (0 in a consistent store; rows past it are
        expected while a write in steps is marked, and go at the next writer's open)."""
        staged = STAGED_KEY in self.manifest()
        with self._lock, _corruption_as_error(self.path):
            query = "SELECT count(*) FROM _items WHERE _row < 0 OR (_row >= ? AND NOT ?)"
            return int(self._con.execute(query, [watermark, staged]).fetchall()[0][0])

    def committed_rows(self) -> int:
        """The committed watermark, read from the database (the truth after any failure)."""
        with self._lock, _corruption_as_error(self.path):
            return int(
                json.loads(
                    self._con.execute("SELECT value FROM manifest WHERE key = 'committed_rows'").fetchall()[0][0]
                )
            )

    def set_manifest(self, key: str, value: Any) -> None:
        """Insert or replace one manifest entry (its own transaction)."""
        self.set_manifest_entries({key: value})

    def set_manifest_entries(self, entries: dict[str, Any]) -> None:
        """Insert or replace manifest entries, all in one transaction (a value None removes its entry)."""
        with self._lock, self._transaction():
            for key, value in entries.items():
                self._put_manifest(key, value)

    def _put_manifest(self, key: str, value: Any) -> None:
        """Insert or replace one manifest entry (None: remove it) inside the caller's transaction."""
        self._con.execute("DELETE FROM manifest WHERE key = ?", [key])
        if value is not None:
            self._con.execute("INSERT INTO manifest VALUES (?, ?)", [key, json.dumps(value)])

    def _set_watermark(self, rows: int) -> None:
        self._con.execute("UPDATE manifest SET value = ? WHERE key = 'committed_rows'", [json.dumps(rows)])

    def _add_columns(self, metadata: pa.Table) -> None:
        existing = self.columns()
        self._con.register("_meta_probe", metadata.slice(0, 0))
        try:
            described = self._con.execute("DESCRIBE SELECT * FROM _meta_probe").fetchall()
        finally:
            self._con.unregister("_meta_probe")
        added = False
        by_lower = {column.lower(): column for column in [*existing, "id"]}
        for name, dtype, *_ in described:
            if name in existing or name == "id":
                continue
            if name.lower() in by_lower:
                raise MetadataError(
                    f"metadata column {name!r} differs from the store's column {by_lower[name.lower()]!r} only in "
                    "case, and DuckDB's column names ignore case: use the store's spelling"
                )
            if dtype == '"NULL"' or dtype.upper() == "NULL":
                dtype = "VARCHAR"  # an all-null first batch: text is the least surprising type
            self._con.execute(f"ALTER TABLE _items ADD COLUMN {_quote(name)} {dtype}")
            added = True
        if added:
            self._refresh_view()


T = TypeVar("T")
_READ_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}


def _parse_tree_names(tree: Any) -> tuple[set[str], set[str], set[str]]:
    """Every query-node type (``*_NODE``), function name and table name (lower case) in a json_serialize_sql
    tree. Operators are functions too (``LIKE`` is ``~~``, division ``/``)."""
    nodes: set[str] = set()
    functions: set[str] = set()
    tables: set[str] = set()
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            kind = item.get("type")
            if isinstance(kind, str) and kind.endswith("_NODE"):
                nodes.add(kind)
            if isinstance(item.get("function_name"), str):
                functions.add(item["function_name"].lower())
            if kind == "BASE_TABLE" and isinstance(item.get("table_name"), str):
                tables.add(item["table_name"].lower())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return nodes, functions, tables


@contextmanager
def _corruption_as_error(path: Path) -> Iterator[None]:
    try:
        yield
    except duckdb.OutOfMemoryException as e:
        raise _out_of_memory("reading", path, e) from None
    except duckdb.FatalException as e:  # the engine, not the file: an earlier write failed (a full disk)
        raise StorageError(f"cannot read catalog {path}: {_first_line(e)}; open the store again") from None
    except duckdb.Error as e:
        raise CorruptStoreError(f"cannot read catalog {path}: {_first_line(e)}") from None


def _out_of_memory(doing: str, path: Path, e: duckdb.Error) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"DuckDB ran out of memory {doing} the catalog {path} ({_first_line(e)}); nothing was changed. Free "
        "memory, or write (or ask for) fewer rows or less metadata in one call"
    )


def _locked(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the configuration of ``con``'s database instance is locked."""
    return bool(con.execute("SELECT current_setting('lock_configuration')").fetchall()[0][0])


def _arrow(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    rel = con.sql(sql)
    if hasattr(rel, "to_arrow_table"):  # duckdb >= 1.4
        return rel.to_arrow_table()
    t = rel.arrow()
    return t.read_all() if hasattr(t, "read_all") else t


def _arrow_reader(con: duckdb.DuckDBPyConnection, sql: str) -> pa.RecordBatchReader:
    rel = con.sql(sql)
    return rel.to_arrow_reader() if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch()


class _StatementLock:
    """The catalog's re-entrant lock, which also holds its connection. An exception leaving it (a Ctrl-C landing
    between DuckDB's execute and fetch) ends the result the connection may still hold: DuckDB 2 refuses to
    register a table on a connection with an unfinished result, so every later add failed until a reopen."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.con: duckdb.DuckDBPyConnection | None = None
        self._handled: list[BaseException | None] = []  # what the caller was handling at each entry (nested)

    def __enter__(self) -> None:
        self._lock.acquire()
        self._handled.append(sys.exc_info()[1])

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        try:
            handled = self._handled.pop()
            if kind is not None:
                _end_result(self.con)
        finally:
            self._lock.release()
        if error is not None and not isinstance(error, KeyboardInterrupt) and _interrupted(error, handled):
            raise KeyboardInterrupt from None  # not the error a converter or a cleanup made of it


def _roll_back(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction (none: nothing to do, or DuckDB aborted it), also when a Ctrl-C lands
    in the rollback itself: the transaction stayed open, and the next add failed ("cannot start a transaction
    within a transaction"). The interrupt is raised once the rollback is done."""
    _end_result(con)  # DuckDB 2 refuses to roll back while a statement's result is unfinished
    interrupted = False
    for _ in range(5):
        try:
            con.rollback()
        except duckdb.Error:
            pass
        except KeyboardInterrupt:
            interrupted = True
            continue
        except RuntimeError as e:
            if _interrupt_or(e) is e:
                raise
            interrupted = True
            continue
        break
    if interrupted:
        raise KeyboardInterrupt


def _close_quietly(con: duckdb.DuckDBPyConnection | None) -> None:
    with suppress(Exception):  # closed already, or never opened
        if con is not None:
            con.close()


def _end_result(con: duckdb.DuckDBPyConnection | None) -> None:
    """Cancel the rest of the last execute's result, if any (DuckDB 2; earlier releases close it at the next
    statement)."""
    with suppress(Exception):  # a closed or unusable connection has nothing to end
        abort = getattr(con, "abort", None)
        if abort is not None:
            abort()


class _Unusable:
    """In place of a connection that could not be made again: every use raises StorageError (closing is
    allowed)."""

    def __init__(self, message: str):
        self._message = message

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise StorageError(self._message)


@contextmanager
def _insert_errors(duplicate: str) -> Iterator[None]:
    """DuckDB's refusals of an insert (outside the transaction it rolled back) as the store's typed errors."""
    try:
        yield
    except duckdb.ConversionException as e:
        raise MetadataError(f"metadata does not fit the store's column types: {_first_line(e)}") from None
    except (duckdb.NotImplementedException, duckdb.InvalidInputException) as e:
        raise MetadataError(f"metadata of a type the catalog cannot store: {_first_line(e)}") from None
    except duckdb.ConstraintException as e:
        raise DuplicateIdError(f"{duplicate}: {_first_line(e)}") from None


def _refused_cast(column: str, stored: str, given: str) -> str:
    """SQL that is true where a value of ``column`` (of DuckDB type ``given``) cannot be stored as ``stored``:
    no cast, or one that changes it (1.7 into BIGINT, a struct field the column lacks). Text is parsed as
    DuckDB parses it ('12' into BIGINT), so it is only required to cast."""
    cast = f"TRY_CAST({column} AS {stored})"
    fails = f"({cast} IS NULL AND {column} IS NOT NULL)"
    if given == stored or given.upper() in ("VARCHAR", '"NULL"', "NULL"):
        return fails
    return f"({fails} OR TRY_CAST({cast} AS {given}) IS DISTINCT FROM {column})"


def _register_metadata(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    """``table`` (ids and metadata) registered as ``name``; a column type DuckDB cannot read is the caller's
    MetadataError."""
    try:
        con.register(name, table)
    except duckdb.NotImplementedException as e:
        types = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
        raise MetadataError(f"metadata of a type the catalog cannot store ({types}): {_first_line(e)}") from None


def _interrupted(error: BaseException, handled: BaseException | None) -> bool:
    """Whether ``error`` or an error it was raised while handling is the user's Ctrl-C (see _interrupt_or),
    up to ``handled``: an interrupt the caller was already handling is not this call's."""
    seen: set[int] = set()
    at: BaseException | None = error
    while at is not None and at is not handled and id(at) not in seen:
        seen.add(id(at))
        if isinstance(at, KeyboardInterrupt) or (isinstance(at, Exception) and _interrupt_or(at) is not at):
            return True
        at = at.__cause__ or at.__context__
    return False


def _interrupt_or(e: Exception) -> BaseException:
    """What to raise for ``e``: the user's Ctrl-C, which DuckDB turns into RuntimeError('Query interrupted'),
    or into an error naming the KeyboardInterrupt an Arrow stream it read raised, given back as the
    KeyboardInterrupt it was; anything else as it is."""
    if str(e) == "Query interrupted" or (isinstance(e, duckdb.Error) and _ARROW_INTERRUPT.search(_first_line(e))):
        return KeyboardInterrupt()
    return e


def _copy_error(e: Exception, source: Path, dest: Path) -> BaseException:
    """What a failed copy of the catalog at ``source`` to ``dest`` raises."""
    given = _interrupt_or(e)
    if isinstance(given, duckdb.OutOfMemoryException):
        return _out_of_memory("copying", source, given)
    if isinstance(given, duckdb.Error):  # I/O, or a checkpoint DuckDB calls fatal: the disk, in practice
        return StorageError(f"cannot write a copy of the catalog to {dest}: {_first_line(given)}")
    return given


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
