"""Write storage/v1_fixture.mrl and storage/v1_fixture.expected.json (run once per format version).

    python storage/make_v1_fixture.py

The store is tiny but exercises every part of format version 1: three bands, small chunks (so several
chunk files per band), an HNSW cache, typed metadata columns added by a later batch, a delete and an
upsert (tombstones). The JSON holds what a reader must find, independent of the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

import mrlstore  # noqa: E402


def main() -> None:
    path = HERE / "v1_fixture.mrl"
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(2026)
    x = rng.standard_normal((45, 32)).astype(np.float32)
    with mrlstore.open(path, dim=32, bands=(8, 16, 32), index_dims=(8,), chunk_rows=16) as store:
        store.add_vectors(
            x[:30],
            ids=[f"item-{i:02d}" for i in range(30)],
            metadata=[{"label": ["cat", "dog", "bird"][i % 3], "n": i} for i in range(30)],
        )
        store.add_vectors(
            x[30:40],
            ids=[f"item-{i:02d}" for i in range(30, 40)],
            metadata=[{"label": "fish", "n": i, "weight": i / 4} for i in range(30, 40)],
        )
        store.delete(["item-03", "item-04"])
        store.upsert_vectors(x[40:42], ids=["item-05", "item-40"], metadata=[{"label": "new"}, {"label": "new"}])
        table = store.sql("SELECT * FROM items ORDER BY id")
        ids = table.column("id").to_pylist()
        vectors = np.stack(store.get(ids).column("vector").to_numpy(zero_copy_only=False))
        expected = {
            "format_version": 1,
            "dim": 32,
            "bands": [8, 16, 32],
            "metric": "cosine",
            "dtype": "float16",
            "index_dims": [8],
            "rows": store.info()["rows"],
            "items": table.to_pylist(),
            "vectors": {i: [float(v) for v in vec] for i, vec in zip(ids, vectors)},
        }
    for junk in path.glob("catalog.duckdb.wal"):
        junk.unlink()
    (HERE / "v1_fixture.expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {path} ({len(ids)} live items)")


if __name__ == "__main__":
    main()
