"""Ingest throughput: ``store.add_arrow`` streaming a Parquet file of embeddings, against ``add_vectors`` from
an in-memory numpy array of the same vectors, same run.

    python benchmarks/ingest.py                 # 200,000 x 2048 float16 MRL-like vectors
    python benchmarks/ingest.py --n 1000000     # the 1M case (about 5 minutes)

Writes the Parquet file once (``--work``), then, each in its own process so peak memory is its own: (a)
``add_arrow(pq.ParquetFile(f, pre_buffer=False, ...).iter_batches(), vector="embedding")``; (b)
``add_vectors`` of the whole array loaded in memory, in batches of 65,536 rows. Reports rows/s and peak
anonymous resident memory (sampled; the store's memory-mapped chunks are page cache, not counted; for
numpy it includes the array).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class PeakAnon:
    """Peak anonymous resident memory (the heap; the store's memory-mapped files are page cache), sampled."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def write_parquet(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mrlstore.testing import mrl_like_blocks

    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float16(), 2048)), ("label", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        lo = 0
        for block, labels in mrl_like_blocks(n, 2048, noise=1.0, seed=0, block_rows=65536):
            flat = pa.array(block.astype(np.float16).reshape(-1))
            w.write_table(pa.table({
                "id": [str(i) for i in range(lo, lo + len(block))],
                "embedding": pa.FixedSizeListArray.from_arrays(flat, 2048),
                "label": [f"c{c}" for c in labels],
            }, schema=schema))  # fmt: skip
            lo += len(block)


def child(mode: str, parquet: Path, store_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    import mrlstore

    shutil.rmtree(store_path, ignore_errors=True)
    if mode == "numpy":
        table = pq.read_table(parquet)
        n = table.num_rows
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(n, 2048)
        ids, labels = table.column("id").to_pylist(), table.select(["label"])
        del table
    mem = PeakAnon()
    t0 = time.perf_counter()
    with mrlstore.open(store_path, dim=2048) as store:
        if mode == "arrow":
            # pre_buffer=False: pyarrow's default read-ahead keeps every row group read so far (a file's worth)
            reader = pq.ParquetFile(parquet, pre_buffer=False, buffer_size=1 << 20)
            n = store.add_arrow(reader.iter_batches(batch_size=16384), vector="embedding")
        else:
            for lo in range(0, n, 65536):
                meta = pa.Table.from_batches(labels.slice(lo, 65536).to_batches())
                store.add_vectors(vectors[lo : lo + 65536], ids=ids[lo : lo + 65536], metadata=meta)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"mode": mode, "rows": n, "seconds": seconds, "peak_anon_mib": mem.stop()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "ingest")
    ap.add_argument("--child", choices=["arrow", "numpy"])
    args = ap.parse_args()
    parquet = args.work / f"embeddings_{args.n}.parquet"
    if args.child:
        child(args.child, parquet, args.work / f"store_{args.child}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not parquet.exists():
        t0 = time.perf_counter()
        tmp = parquet.with_suffix(".tmp")
        write_parquet(tmp, args.n)
        tmp.rename(parquet)  # a failed write leaves no file that looks complete
        print(f"wrote {parquet} ({parquet.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    for mode in ("arrow", "numpy"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(args.n), "--work", str(args.work)],
                             capture_output=True, text=True)  # fmt: skip
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(line[-1][7:])
        print(f"{mode:>6}: {r['rows']:,} rows in {r['seconds']:.1f} s = {r['rows'] / r['seconds']:,.0f} rows/s, "
              f"peak anonymous memory {r['peak_anon_mib']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
