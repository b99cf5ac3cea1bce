"""where= and sql() reach only the store's tables: no files, network, extensions, ATTACH, COPY or settings,
whatever the text, through the Python API and the command line; a refused call changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from cli_support import run_cli

import mrlstore
from mrlstore import ForbiddenSQLError, InvalidFilterError


@pytest.fixture
def store(tmp_path):
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n")
    s = mrlstore.open(tmp_path / "s.mrl", dim=16, bands=(8, 16), index_dims=(8,))
    s.add_vectors(np.random.default_rng(0).random((40, 16)), metadata=[{"label": str(i % 4)} for i in range(40)])
    yield s
    s.close()


def _secret(tmp_path) -> str:
    return str(tmp_path / "secret.csv")


# Each reads or writes outside the catalog; {f} is a real file beside the store.
SQL_REFUSED = [
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/root/*')",
    "SELECT * FROM read_csv('{f}')",
    "SELECT * FROM read_csv_auto('{f}')",
    "SELECT * FROM read_parquet('{f}')",
    "SELECT * FROM read_json('{f}')",
    "SELECT * FROM '{f}'",
    "SELECT * FROM 'https://example.com/data.parquet'",
    "SELECT * FROM sniff_csv('{f}')",
    "SELECT * FROM duckdb_databases()",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM duckdb_extensions()",
    "SELECT * FROM pragma_database_list",
    "SELECT name, setting FROM pg_settings",
    "SELECT * FROM pg_catalog.pg_settings",
    "SELECT * FROM '{f}.duckdb.tmp/x.csv'",
    "SELECT * FROM 'secret.csv'",
    "SELECT current_setting('temp_directory')",
    "SELECT * FROM query('SELECT * FROM read_text(''/etc/hostname'')')",
    "COPY items TO '{f}.out'",
    "COPY (SELECT * FROM items) TO '{f}.out' (FORMAT parquet)",
    "EXPORT DATABASE '{f}.dir'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET lock_configuration",
    "PRAGMA version",
    "ATTACH '{f}.db' AS other",
    "DETACH memory",
    "CREATE TABLE t AS SELECT 1",
    "DELETE FROM _items",
    "WITH d AS (DELETE FROM _items RETURNING *) SELECT * FROM d",
    "SELECT 1; DELETE FROM _items",
    "CALL checkpoint()",
]

WHERE_REFUSED = [
    "(SELECT count(*) FROM read_text('/etc/hostname')) > 0",
    "(SELECT count(*) FROM glob('/root/*')) > 0",
    "(SELECT count(*) FROM read_csv('{f}')) > 0",
    "EXISTS (SELECT * FROM '{f}')",
    "current_setting('threads') = '2'",
    "label IN (SELECT database_name FROM duckdb_databases())",
    "EXISTS (SELECT * FROM pg_settings WHERE name = 'secret_directory' AND setting LIKE '/root%')",
]


@pytest.mark.parametrize("text", SQL_REFUSED)
def test_sql_outside_the_catalog_is_refused(store, tmp_path, text):
    text = text.format(f=_secret(tmp_path))
    with pytest.raises(InvalidFilterError) as err:
        store.sql(text)
    assert "sql()" in str(err.value) and "Traceback" not in str(err.value)
    assert len(store) == 40 and not list(tmp_path.glob("secret.csv.*"))
    assert store.sql("SELECT count(*) AS n FROM items").column("n").to_pylist() == [40]


@pytest.mark.parametrize("text", WHERE_REFUSED)
def test_filters_outside_the_catalog_are_refused(store, tmp_path, text):
    text = text.format(f=_secret(tmp_path))
    with pytest.raises(ForbiddenSQLError) as err:
        store.query(np.ones(16), k=3, where=text)
    assert text in str(err.value)


def test_refusals_name_what_was_refused(store):
    with pytest.raises(ForbiddenSQLError, match=r"read_text\(\)"):
        store.sql("SELECT * FROM read_text('/etc/hostname')")
    with pytest.raises(ForbiddenSQLError, match="COPY"):
        store.sql("COPY items TO '/tmp/x.csv'")
    with pytest.raises(ForbiddenSQLError, match="ATTACH"):
        store.sql("ATTACH '/tmp/x.db'")
    with pytest.raises(ForbiddenSQLError, match="got 2 statements"):  # as the README says (it was the parent class)
        store.sql("SELECT 1; DELETE FROM items")
    with pytest.raises(InvalidFilterError, match="got no statement"):
        store.sql("  ")
    assert isinstance(ForbiddenSQLError("x"), ValueError)


def test_the_store_tables_still_answer(store):
    got = store.sql("SELECT label, count(*) AS n FROM items GROUP BY 1 ORDER BY 1").to_pylist()
    assert got == [{"label": str(i), "n": 10} for i in range(4)]
    assert len(store.query(np.ones(16), k=5, where="label = '1' AND length(id) > 0").ids) == 5
    assert len(store.query(np.ones(16), k=5, where="lower(label) IN ('1', '2') AND regexp_matches(id, '.')").ids) == 5


@pytest.mark.parametrize(
    "where, n",
    [("label LIKE '1%'", 10), ("label ILIKE '1'", 10), ("label NOT LIKE '1'", 30), ("label SIMILAR TO '[12]'", 20),
     ("CAST(label AS INT) / 2 >= 1", 20), ("CAST(label AS INT) // 2 = 1", 20), ("id ~~ '%'", 40)],
)  # fmt: skip
def test_operators_are_not_refused_as_paths(store, where, n):
    """DuckDB names operators as functions (LIKE is ~~, division /): only table names that look like paths
    are refused."""
    assert len(store.query(np.ones(16), k=40, where=where).ids) == n
    assert store.sql(f"SELECT count(*) AS n FROM items WHERE {where}").column("n").to_pylist() == [n]


def test_read_only_readers_are_sandboxed_too(store, tmp_path):
    with mrlstore.open(tmp_path / "s.mrl", read_only=True) as reader:
        with pytest.raises(ForbiddenSQLError):
            reader.sql("SELECT * FROM read_text('/etc/hostname')")
        assert reader.sql("SELECT count(*) AS n FROM items").column("n").to_pylist() == [40]


def test_snapshots_and_publishing_still_copy_the_catalog(store, tmp_path):
    store.snapshot(tmp_path / "copy.mrl")
    with mrlstore.open(tmp_path / "copy.mrl", read_only=True) as copy:
        assert copy.sql("SELECT count(*) AS n FROM items").column("n").to_pylist() == [40]
        assert copy.manifest["dim"] == 16


@pytest.mark.parametrize(
    "args",
    [
        ["sql", "{s}", "SELECT * FROM read_text('/etc/hostname')"],
        ["sql", "{s}", "SELECT * FROM glob('/root/*')"],
        ["sql", "{s}", "COPY items TO '{f}.out'"],
        ["sql", "{s}", "ATTACH '{f}.db'"],
        ["query", "{s}", "{q}", "--where", "(SELECT count(*) FROM read_text('/etc/hostname')) > 0"],
    ],
)
def test_the_command_line_refuses_them_in_one_line(store, tmp_path, args):
    np.save(tmp_path / "q.npy", np.ones(16, dtype=np.float32))
    subs = {"s": str(tmp_path / "s.mrl"), "f": _secret(tmp_path), "q": str(tmp_path / "q.npy")}
    out = run_cli(*[a.format(**subs) for a in args])  # the command's code path, in this process
    assert out.returncode == 1, out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "refused" in out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.glob("secret.csv.*"))


LONG_QUERY_INTERRUPTED = """
import signal, sys, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a shell (a parent may ignore it)
import numpy as np
import mrlstore

store = mrlstore.open(sys.argv[1], dim=8)
store.add_vectors(np.ones((2000, 8), np.float32), metadata=[{"n": i} for i in range(2000)])
main = threading.get_ident()
threading.Timer(1.5, lambda: signal.pthread_kill(main, signal.SIGINT)).start()  # Ctrl-C
try:
    store.sql("SELECT sum(a.n * b.n - c.n) FROM items a, items b, items c")  # seconds: 8e9 rows
    print("the query ended")
except KeyboardInterrupt:
    print("KeyboardInterrupt", store.sql("SELECT count(*) AS n FROM items")["n"][0].as_py())
"""


def test_ctrl_c_in_a_long_sql_query_is_a_keyboard_interrupt_and_nothing_is_printed(tmp_path):
    """DuckDB turned it into RuntimeError('Query interrupted') (`mrlstore sql` exited 1, not 130) and drew its
    progress bar on standard output."""
    script = tmp_path / "long.py"
    script.write_text(LONG_QUERY_INTERRUPTED)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "KeyboardInterrupt 2000\n"


SNAPSHOTS_INTERRUPTED = """
import collections, json, random, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a shell (a parent may ignore it)
import numpy as np
import mrlstore

folder = sys.argv[1]
store = mrlstore.open(folder + "/store", dim=8)
n = 20000
store.add_vectors(np.ones((n, 8), np.float32), metadata=[{"n": i, "note": "x" * 40} for i in range(n)])
started = time.perf_counter()
store.snapshot(folder + "/timing")
took = time.perf_counter() - started
main, pick = threading.get_ident(), random.Random(0)
seen = collections.Counter()
for i in range(12):  # Ctrl-C at moments spread over a snapshot's time
    timer = threading.Timer(pick.uniform(0, took), lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    try:
        try:
            store.snapshot(f"{folder}/copy{i}")
            outcome = "returned"
        except KeyboardInterrupt:
            outcome = "KeyboardInterrupt"
        except BaseException as e:
            outcome = type(e).__name__ + ": " + str(e)[-60:]
        timer.join()
        time.sleep(0.01)  # a signal sent after the snapshot returned lands here
    except KeyboardInterrupt:
        pass
    seen[outcome] += 1
print(json.dumps({"seen": sorted(seen), "rows": len(store), "problems": store.verify(), "took": took}))
"""


def test_ctrl_c_during_a_snapshot_is_a_keyboard_interrupt(tmp_path):
    """It came out as RuntimeError('Query interrupted'), or as StorageError ("cannot write a copy of the catalog
    ... transaction is aborted", a disk failure) where the copy's cleanup hid the interrupt."""
    script = tmp_path / "snapshots.py"
    script.write_text(SNAPSHOTS_INTERRUPTED)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert set(report["seen"]) <= {"KeyboardInterrupt", "returned"}, report
    assert report["rows"] == 20000 and report["problems"] == [], report
