"""mrlstore demo: the bundled MRL image encoder, a store built from images, a 16-d -> 2048-d query.

    python examples/demo.py [--store demo_store] [--out demo_output]

Runs offline: the encoder's weights ship inside the package (mrlstore/encoder/weights/, see its MODEL_CARD.md).

Adds the sample photos shipped in examples/images/ (12 Caltech-101 photos in each of 10 classes that the
encoder never saw in training; the class is the folder name) except one per class, which are kept back as
queries. Queries each held-out photo with dims=[16, 2048] (16-d HNSW shortlist, 2048-d re-rank) and writes
demo_output/query_grid.png: every query with its top hits, captioned with class and cosine score.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import mrlstore  # noqa: E402

IMAGES = ROOT / "examples" / "images"
TILE = 96


def main() -> None:
    ap = argparse.ArgumentParser(description="mrlstore image demo")
    ap.add_argument("--store", type=Path, default=Path("demo_store"))
    ap.add_argument("--out", type=Path, default=Path("demo_output"))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--weights", type=Path, default=None, help="encoder weights (default: the bundled ones)")
    args = ap.parse_args()

    files = sorted(p for p in IMAGES.rglob("*.jpg"))
    by_class: dict[str, list[Path]] = {}
    for p in files:
        by_class.setdefault(p.parent.name, []).append(p)
    queries = [paths[-1] for paths in by_class.values()]
    database = [p for paths in by_class.values() for p in paths[:-1]]

    shutil.rmtree(args.store, ignore_errors=True)
    t0 = time.perf_counter()
    encoder = mrlstore.load_encoder(args.weights)
    print(f"loaded {encoder} in {time.perf_counter() - t0:.1f} s")
    with mrlstore.open(args.store, encoder=encoder) as store:
        t0 = time.perf_counter()
        store.add([str(p) for p in database], metadata=[{"label": p.parent.name} for p in database])
        print(f"added {len(store)} images to {args.store}/ in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        tuned = store.tune(recall=0.95)  # measures funnels on the store's rows; may fit 16-number codes to them
        print(f"tuned in {time.perf_counter() - t0:.1f} s: shortlists on {tuned.prefixes} codes")

        rows, correct = [], {"16 raw": 0, "16": 0, "2048": 0}
        vectors = encoder.encode([str(q) for q in queries], progress=False)
        for q, v in zip(queries, vectors):
            hits = store.query(v, k=args.k, dims=[16, 2048])
            rows.append((q, hits))
            correct["2048"] += sum(m["label"] == q.parent.name for m in hits.metadata)
            for key, prefixes in (("16", None), ("16 raw", "raw")):
                alone = store.query(v, k=args.k, dims=[16], prefixes=prefixes)
                correct[key] += sum(m["label"] == q.parent.name for m in alone.metadata)
        total = args.k * len(queries)
        print(
            f"\nlabel precision@{args.k} over {len(queries)} held-out queries: dims=[16, 2048] "
            f"{correct['2048'] / total:.2f}; dims=[16] alone {correct['16'] / total:.2f} on the store's "
            f"{tuned.prefixes} codes, {correct['16 raw'] / total:.2f} on the raw 16-prefix"
        )
        print(f"\nthe top {args.k} hits of each held-out query, dims=[16, 2048] (class and cosine score):")
        for q, hits in rows:
            right = sum(m["label"] == q.parent.name for m in hits.metadata)
            shown = ", ".join(f"{m['label']} {s:.2f}" for s, m in zip(hits.scores[:4], hits.metadata[:4]))
            print(f"  {q.parent.name:<10} {right}/{args.k} same class | {shown}, ...")
        q, hits = rows[0]
        print(f"\nfull hits of {q.relative_to(ROOT)}:")
        for _id, score, meta in hits:
            print(f"  {score:.3f}  {meta['label']:<10} {Path(meta['path']).relative_to(ROOT)}")
        print(
            "\nstore.sql: "
            + str(store.sql("SELECT label, count(*) AS n FROM items GROUP BY 1 ORDER BY 1").to_pylist()[:3])
            + " ..."
        )
    grid = write_grid(rows, args.out / "query_grid.png")
    print(f"\nwrote {grid}: each row is a query (left) and its hits")


def write_grid(rows, path: Path) -> Path:
    """One row per query: the query, then its hits, each captioned with its full class name and score."""
    from PIL import Image, ImageDraw, ImageOps

    k = len(rows[0][1].ids)
    caption_h = 26  # two lines: class, then score (or "query")
    canvas = Image.new("RGB", ((k + 1) * (TILE + 6) + 10, len(rows) * (TILE + caption_h + 8) + 6), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (q, hits) in enumerate(rows):
        y = 6 + r * (TILE + caption_h + 8)
        tiles = [(ImageOps.exif_transpose(Image.open(q)), q.parent.name, "query", (40, 40, 200))]
        for score, meta in zip(hits.scores, hits.metadata):
            colour = (0, 130, 0) if meta["label"] == q.parent.name else (200, 0, 0)
            tiles.append((ImageOps.exif_transpose(Image.open(meta["path"])), meta["label"], f"{score:.3f}", colour))
        for c, (img, label, detail, colour) in enumerate(tiles):
            x = 6 + c * (TILE + 6) + (4 if c else 0)
            canvas.paste(img.convert("RGB").resize((TILE, TILE), Image.NEAREST), (x, y))
            draw.text((x, y + TILE + 1), label, fill=colour)
            draw.text((x, y + TILE + 13), detail, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


if __name__ == "__main__":
    main()
