"""The re-rank read against a raw numpy memory map of the same bytes (and zarr-python's own gather).

    python benchmarks/gather_speed.py [--n 100000] [--rows 200] [--reps 300]

Builds a float16 store of N x 2048 random vectors (bands 16/64/256/2048, default chunking) and a raw
memmap file holding the same 2032 columns past the first band; times, for random sorted row sets, the
median of: the raw memmap gather, mrlstore's gather_bands (columns 16..2048), its float16 -> float32
conversion (numpy astype, as the scorer does), and zarr-python's oindex on the widest band.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrlstore.zarr_bands import BandedVectors, auto_chunk_rows, band_edges, create_bands  # noqa: E402


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
    args = ap.parse_args()
    dim, bands = 2048, (16, 64, 256, 2048)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chunks = [auto_chunk_rows(b - a, "float16") for a, b in band_edges(dim, bands)]
        create_bands(root, dim, bands, "float16", chunks, attributes={})
        store = BandedVectors(root, dim, bands, "float16")
        raw = np.memmap(root / "raw.f16", dtype=np.float16, mode="w+", shape=(args.n, dim - 16))
        for lo in range(0, args.n, 10_000):
            block = rng.standard_normal((min(10_000, args.n - lo), dim)).astype(np.float32)
            store.append(lo, block)
            raw[lo : lo + len(block)] = block[:, 16:].astype(np.float16)
        raw.flush()
        raw = np.memmap(root / "raw.f16", dtype=np.float16, mode="r", shape=(args.n, dim - 16))
        sets = [np.sort(rng.choice(args.n, args.rows, replace=False)) for _ in range(args.reps)]
        for warm in sets[:20]:
            raw[warm], store.gather_bands(warm, 16, dim)
        t_raw = median_ms(lambda r: raw[r], sets)
        t_ours = median_ms(lambda r: store.gather_bands(r, 16, dim), sets)
        t_conv = median_ms(lambda r: [b.astype(np.float32) for _, b in store.gather_bands(r, 16, dim)], sets)
        import zarr

        arr = zarr.open_array(str(root / "vectors" / "band_00256_02048"), mode="r")
        t_zarr = median_ms(lambda r: arr.oindex[r, :], sets[:20])
    print(f"N={args.n} rows={args.rows} columns 16..2048 float16 (median of {args.reps})")
    print(f"raw numpy memmap gather:           {t_raw:.3f} ms")
    print(f"mrlstore gather_bands:             {t_ours:.3f} ms  ({t_ours / t_raw:.2f}x raw)")
    print(f"  + float16->float32 (numpy):      {t_conv:.3f} ms")
    print(f"zarr-python oindex, widest band:   {t_zarr:.3f} ms  ({t_zarr / t_raw:.0f}x raw)")


if __name__ == "__main__":
    main()
