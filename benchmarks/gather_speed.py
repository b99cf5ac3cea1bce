"""The re-rank read against a raw numpy memory map of the same bytes (and zarr-python's own gather).

    python benchmarks/gather_speed.py [--n 100000] [--rows 200] [--reps 300] [--dtype float16 float32]

For each dtype: builds a store of N x 2048 random vectors (bands 16/64/256/2048, default chunking) and a
raw memmap file holding the same 2032 columns past the first band; times, for random sorted row sets, the
median of: the raw gather (``np.memmap`` fancy indexing, and the same on a plain ndarray view of the map),
mrlstore's gather_bands (columns 16..2048), gather_bands plus the float32 widening the scorer then needs
(the native F16C kernel when built, else numpy; nothing for float32 stores), and zarr-python's oindex on
the widest band. Writes the table to benchmarks/results/gather_speed.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mrlstore.kernels import NATIVE_F16C, as_float32  # noqa: E402
from mrlstore.tiers.bands import BandedVectors, auto_chunk_rows, band_edges, create_bands  # noqa: E402


def median_ms(fn, row_sets) -> float:
    times = []
    for rows in row_sets:
        t0 = time.perf_counter()
        fn(rows)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--dtype", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    lines = [
        f"N={args.n:,}, {args.rows} random sorted rows, columns 16..2048, median of {args.reps} "
        f"(`python benchmarks/gather_speed.py --n {args.n} --rows {args.rows}`); "
        f"float16 widening: {'native F16C kernel' if NATIVE_F16C else 'numpy'}",
        "",
        "| dtype | raw np.memmap ms | raw ndarray view ms | gather_bands ms | vs np.memmap | vs view "
        "| gather + widen to float32 ms | zarr-python oindex (widest band) ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype in args.dtype:
        r = measure(args.n, args.rows, args.reps, dtype)
        lines.append(
            f"| {dtype} | {r['raw']:.3f} | {r['view']:.3f} | {r['ours']:.3f} | {r['ours'] / r['raw']:.2f}x | "
            f"{r['ours'] / r['view']:.2f}x | {r['conv']:.3f} | {r['zarr']:.1f} ({r['zarr'] / r['raw']:.0f}x) |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gather_speed.md").write_text(text)


def measure(n: int, n_rows: int, reps: int, dtype: str) -> dict[str, float]:
    dim, bands = 2048, (16, 64, 256, 2048)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chunks = [auto_chunk_rows(b - a, dtype) for a, b in band_edges(dim, bands)]
        create_bands(root, dim, bands, dtype, chunks, attributes={})
        store = BandedVectors(root, dim, bands, dtype)
        raw = np.memmap(root / "raw.bin", dtype=dtype, mode="w+", shape=(n, dim - 16))
        for lo in range(0, n, 10_000):
            block = rng.standard_normal((min(10_000, n - lo), dim)).astype(np.float32)
            store.append(lo, block)
            raw[lo : lo + len(block)] = block[:, 16:].astype(dtype)
        raw.flush()
        raw = np.memmap(root / "raw.bin", dtype=dtype, mode="r", shape=(n, dim - 16))
        view = raw.view(np.ndarray)
        sets = [np.sort(rng.choice(n, n_rows, replace=False)) for _ in range(reps)]
        for warm in sets[:20]:
            raw[warm], store.gather_bands(warm, 16, dim)
        out = {
            "raw": median_ms(lambda r: raw[r], sets),
            "view": median_ms(lambda r: view[r], sets),
            "ours": median_ms(lambda r: store.gather_bands(r, 16, dim), sets),
            "conv": median_ms(lambda r: [as_float32(b) for _, b in store.gather_bands(r, 16, dim)], sets),
        }
        import zarr

        arr = zarr.open_array(str(root / "vectors" / "band_00256_02048"), mode="r")
        out["zarr"] = median_ms(lambda r: arr.oindex[r, :], sets[:20])
        store.close()
        return out


if __name__ == "__main__":
    main()
