"""The catalog's memory when a write registers many ids: what grows with the write, and what with the store.

A Ray write's driver commits its ids and metadata through ``Catalog.append_tables``, which goes into DuckDB
in checkpointed transactions of at most APPEND_STEP_ROWS rows. Each case runs in its own process on a fresh
catalog (a store of 8-number vectors; only its catalog is written): ``--base`` rows are registered first,
then the process is measured while it registers ``--rows`` more in checkpointed steps, as the store does,
and with ``--one-transaction`` also in one transaction (the commit before steps existed). Then
``--small-adds`` commits of 1,000 rows each as ``Store.add`` makes them (``rows_of``, then ``commit_rows``).
Reported: peak and final anonymous memory of the process, DuckDB's own account of what it holds
(``duckdb_memory()``) after each part, and the small adds' median time; for ``duckdb`` cases, then the
upgrade ``Store.compact()`` makes of such a store with nothing deleted (``Catalog.drop_id_index``, and the
first lookup, which builds the cache). ``--id-index`` picks how ids are
found: ``cache`` (format 4: the ``ids/`` runs) or ``duckdb`` (formats 1-3: the table made again, empty, with
``id ... UNIQUE`` as those formats made it, which the catalog then uses as it did: DuckDB's index refuses
repeats and ``rows_of`` joins on ``id``); both by default, each case in its own process.

``--alternatives N`` measures, on raw DuckDB tables of N random ids, what a store without DuckDB's unique
index on ``id`` would trade: whether a memory limit makes DuckDB evict the index (inserting 500k more ids
with a checkpoint after each step of 262,144), the file's size with and without the index, and what
checking a batch against the stored ids by a hash join costs instead.

    python benchmarks/catalog_memory.py --base 0 2000000 --rows 500000 2000000 --ids sequential random
    python benchmarks/catalog_memory.py --base 8000000 --rows 2000000 --ids random --small-adds 20
    python benchmarks/catalog_memory.py --alternatives 8000000
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import rss_anon_mib  # noqa: E402  (benchmarks/compare.py)

BATCH = 16384  # rows per Arrow table handed to append_tables, as a sink's fragments come


def ids(lo: int, count: int, kind: str) -> pa.Array:
    """``count`` distinct ids from position ``lo``: decimal row numbers, or 64-bit hashes of them."""
    n = np.arange(lo, lo + count, dtype=np.uint64)
    if kind == "random":
        n = n * np.uint64(0x9E3779B97F4A7C15)  # odd multiplier: a permutation of the 64-bit numbers
    return pa.array(n).cast(pa.string())


def tables(lo: int, count: int, kind: str) -> Iterator[pa.Table]:
    labels = np.char.add("c", (np.arange(BATCH) % 100).astype(str))
    for start in range(lo, lo + count, BATCH):
        k = min(BATCH, lo + count - start)
        yield pa.table({"id": ids(start, k, kind), "label": labels[:k]})


def duckdb_held(catalog) -> dict[str, int]:  # noqa: ANN001
    return {tag: held >> 20 for tag, held in catalog.memory_held().items()}


def child(
    base: int, rows: int, kind: str, one_transaction: bool, small_adds: int, work: str | None, id_index: str
) -> dict:
    from ingest import PeakAnon

    import mrlstore
    from mrlstore.tiers.catalog import DB_FILE, Catalog

    work_dir = Path(tempfile.mkdtemp(prefix="catalog_memory_", dir=work))
    try:
        with mrlstore.open(work_dir / "s.mrl", dim=8, index_dims=[8]):
            pass
        if id_index == "duckdb":  # the empty table as formats 1-3 made it
            import duckdb

            with duckdb.connect(str(work_dir / "s.mrl" / DB_FILE)) as con:
                con.execute("DROP VIEW items")
                con.execute("DROP TABLE _items")
                con.execute("CREATE TABLE _items (_row BIGINT PRIMARY KEY, id VARCHAR NOT NULL UNIQUE)")
                con.execute("CREATE VIEW items AS SELECT * EXCLUDE (_row) FROM _items")
        catalog = Catalog(work_dir / "s.mrl", read_only=False)
        if base:
            catalog.append_tables(0, tables(0, base, kind), base)
            catalog.close()  # measure from a fresh open, as a new driver would
            catalog = Catalog(work_dir / "s.mrl", read_only=False)
        out: dict = {"base": base, "rows": rows, "ids": kind, "one_transaction": one_transaction, "index": id_index}
        out["anon_open_mib"] = rss_anon_mib()
        mem, t0 = PeakAnon(), time.perf_counter()
        catalog.append_tables(base, tables(base, rows, kind), base + rows, step_rows=rows if one_transaction else None)
        out.update(write_s=time.perf_counter() - t0, write_peak_mib=mem.stop(), write_after_mib=rss_anon_mib())
        out["write_duckdb_mib"] = duckdb_held(catalog)
        mem, end, times = PeakAnon(), base + rows, []
        for _ in range(small_adds):
            batch = next(tables(end, 1000, kind))
            t0 = time.perf_counter()
            new_ids = batch.column("id").to_pylist()
            if catalog.rows_of(new_ids):
                raise AssertionError("a new id was found")
            catalog.commit_rows(end, new_ids, batch.drop_columns(["id"]), end + 1000)
            times.append(time.perf_counter() - t0)
            end += 1000
        out.update(small_ms=float(np.median(times)) * 1e3 if times else 0.0, small_peak_mib=mem.stop())
        out["small_after_mib"] = rss_anon_mib()
        out["small_duckdb_mib"] = duckdb_held(catalog)
        if id_index == "duckdb":  # what Store.compact() does to such a store with nothing deleted
            mem, t0 = PeakAnon(), time.perf_counter()
            catalog.drop_id_index(4)
            catalog.rows_of(["absent"])  # the first lookup builds the cache's runs
            out.update(upgrade_s=time.perf_counter() - t0, upgrade_peak_mib=mem.stop())
        catalog.close()
        return out
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def alternatives(n: int, work: str | None) -> None:
    import duckdb

    folder = Path(tempfile.mkdtemp(prefix="catalog_memory_", dir=work))
    try:
        sizes = {}
        for unique in (True, False):
            path = folder / f"unique_{unique}.duckdb"
            con = duckdb.connect(str(path))
            con.execute(f"CREATE TABLE t (_row BIGINT PRIMARY KEY, id VARCHAR NOT NULL {'UNIQUE' if unique else ''})")
            for lo in range(0, n, 262_144):
                insert(con, lo, min(262_144, n - lo))
            con.close()
            sizes[unique] = path.stat().st_size / 2**20
        print(f"{n:,} random ids: catalog file {sizes[True]:.0f} MiB with the unique index, {sizes[False]:.0f} without")
        evict(folder / "unique_True.duckdb", n)
        check_cost(folder / "unique_False.duckdb", n)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def insert(con, lo: int, count: int) -> None:  # noqa: ANN001
    con.register("_b", pa.table({"_row": np.arange(lo, lo + count), "id": ids(lo, count, "random")}))
    con.execute("INSERT INTO t SELECT * FROM _b")
    con.unregister("_b")
    con.execute("CHECKPOINT")


def evict(path: Path, n: int) -> None:
    import duckdb

    con = duckdb.connect(str(path), config={"memory_limit": "150MB"})
    try:
        for lo in range(n, n + 500_000, 262_144):
            insert(con, lo, min(262_144, n + 500_000 - lo))
        print(f"memory_limit 150MB, 500k more ids with a checkpoint per step: went in, peak {rss_anon_mib():.0f} MiB")
    except duckdb.OutOfMemoryException as e:
        print(f"memory_limit 150MB, 500k more ids with a checkpoint per step: refused ({str(e).splitlines()[0]})")
    finally:
        con.close()


def check_cost(path: Path, n: int) -> None:
    import duckdb

    con = duckdb.connect(str(path))
    for batch in (1, 1000, 262_144):
        con.register("_b", pa.table({"id": pa.concat_arrays([ids(n, batch - 1, "random"), ids(5, 1, "random")])}))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            found = con.execute("SELECT t.id FROM t SEMI JOIN _b ON t.id = _b.id LIMIT 1").fetchall()
            times.append(time.perf_counter() - t0)
        con.unregister("_b")
        ms = float(np.median(times)) * 1e3
        print(f"duplicate check of {batch:,} ids (one repeated) by hash join: {ms:.1f} ms median of 5, "
              f"{ms / (n / 1e6):.1f} ms per million stored ids; found {len(found)}")  # fmt: skip
    con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=int, nargs="+", default=[0, 2_000_000], help="rows in the store before")
    ap.add_argument("--rows", type=int, nargs="+", default=[500_000, 2_000_000], help="rows of the measured write")
    ap.add_argument("--ids", nargs="+", choices=["sequential", "random"], default=["sequential", "random"])
    ap.add_argument("--one-transaction", action="store_true", help="also run each case in one transaction")
    ap.add_argument("--small-adds", type=int, default=20, help="commits of 1,000 rows after the write")
    ap.add_argument("--id-index", nargs="+", choices=["cache", "duckdb"], default=["cache", "duckdb"])
    ap.add_argument("--work", default=None, help="folder for the temporary catalogs (default: the system's)")
    ap.add_argument("--alternatives", type=int, default=0, metavar="N", help="raw DuckDB at N random ids instead")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.alternatives:
        alternatives(args.alternatives, args.work)
        return
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return
    modes = [False, True] if args.one_transaction else [False]
    print("| ids | ids found by | store before | memory at open | write | commit | time | peak | after | "
          f"DuckDB holds after | {args.small_adds} adds of 1,000: median | peak | after | DuckDB holds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    upgrades: list[str] = []
    for kind, base, rows, one, index in itertools.product(args.ids, args.base, args.rows, modes, args.id_index):
        spec = {"base": base, "rows": rows, "kind": kind, "one_transaction": one, "small_adds": args.small_adds,
                "work": args.work, "id_index": index}  # fmt: skip
        cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        cells = [
            kind,
            "ids/ cache" if index == "cache" else "DuckDB index",
            f"{base:,}",
            f"{r['anon_open_mib']:.0f} MiB",
            f"{rows:,}",
            "one transaction" if one else "steps",
            f"{r['write_s']:.1f} s",
            f"{r['write_peak_mib']:.0f} MiB",
            f"{r['write_after_mib']:.0f} MiB",
            held(r["write_duckdb_mib"]),
            f"{r['small_ms']:.1f} ms",
            f"{r['small_peak_mib']:.0f} MiB",
            f"{r['small_after_mib']:.0f} MiB",
            held(r["small_duckdb_mib"]),
        ]
        print("| " + " | ".join(cells) + " |")
        if "upgrade_s" in r:
            upgrades.append(f"{kind} ids, {base + rows + 1000 * args.small_adds:,} rows: upgrade to format 4 "
                            f"(drop_id_index, then the first lookup builds the runs) {r['upgrade_s']:.1f} s, "
                            f"peak {r['upgrade_peak_mib']:.0f} MiB")  # fmt: skip
    print("\n".join(["", *upgrades]) if upgrades else "")


def held(tags: dict[str, int]) -> str:
    return ", ".join(f"{tag.lower()} {mib} MiB" for tag, mib in sorted(tags.items())) or "nothing"


if __name__ == "__main__":
    main()
