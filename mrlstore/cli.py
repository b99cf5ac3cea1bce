"""The command line: ``mrlstore`` (console script) and ``python -m mrlstore``.

Exit codes: 0 success, 1 an error the store reports (a typed MRLStoreError, printed on one line), 2 a
usage error (click's convention).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

import mrlstore
from mrlstore.errors import CorruptStoreError, MRLStoreError


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _reports_errors(fn: Any) -> Any:
    """Store errors become one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MRLStoreError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return run


def _print_table(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("(no rows)")
        return
    columns = list(dict.fromkeys(c for r in rows for c in r))
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mrlstore.__version__, prog_name="mrlstore")
def main() -> None:
    """mrlstore: a Matryoshka embeddings store (Zarr bands, HNSW prefixes, DuckDB metadata)."""


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--dim", type=int, help="Vector length (default: 2048, for the bundled image encoder).")
@click.option("--bands", help="Band ends, e.g. 16,64,256,2048.")
@click.option("--index-dims", help="Prefixes with an HNSW index, e.g. 16,32.")
@click.option("--metric", type=click.Choice(["cosine", "ip", "l2"]))
@click.option("--dtype", type=click.Choice(["float16", "float32"]))
@_reports_errors
def create(path: Path, dim: int | None, bands: str | None, index_dims: str | None, metric: str | None,
           dtype: str | None) -> None:  # fmt: skip
    """Create a store at PATH."""
    if (path / "catalog.duckdb").exists():
        raise click.UsageError(f"{path} already holds a store")
    with mrlstore.open(path, dim, bands=_ints(bands), index_dims=_ints(index_dims), metric=metric, dtype=dtype) as s:
        click.echo(f"created {s.path}: dim={s.dim} bands={list(s.bands)} index_dims={list(s.index_dims)}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--skip-errors", is_flag=True, help="Leave out unreadable files (listed) instead of failing.")
@click.option("--on-conflict", type=click.Choice(["skip", "replace", "error"]), default="skip", show_default=True,
              help="For images already in the store (same content).")  # fmt: skip
@click.option("--batch-size", type=int, default=64, show_default=True)
@_reports_errors
def add(path: Path, inputs: tuple[str, ...], skip_errors: bool, on_conflict: str, batch_size: int) -> None:
    """Add images (files and folders) to the store at PATH; a .npy file adds its rows as vectors."""
    with mrlstore.open(path) as store:
        vectors = [i for i in inputs if i.endswith(".npy")]
        images = [i for i in inputs if not i.endswith(".npy")]
        for f in vectors:
            ids = store.add_vectors(np.load(f, allow_pickle=False))
            click.echo(f"{f}: added {len(ids)} vectors")
        if images:
            result = store.add(images, skip_errors=skip_errors, on_conflict=on_conflict, batch_size=batch_size,
                               progress=True)  # fmt: skip
            click.echo(
                f"added {result.added} images, {len(result.skipped)} already present, {len(result.failed)} failed"
            )
            for failure in result.failed:
                click.echo(f"  skipped {failure.source}: {failure.reason}", err=True)


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.argument("query")
@click.option("-k", "--k", "k", type=int, default=10, show_default=True)
@click.option("--dims", help="The funnel, e.g. 16,2048 (default: the tuned setting).")
@click.option("--where", help="A DuckDB filter over the metadata, e.g. \"label = 'cat'\".")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_reports_errors
def query(path: Path, query: str, k: int, dims: str | None, where: str | None, as_json: bool) -> None:
    """Query the store at PATH with an image file or a .npy vector (1-D, or 2-D for several)."""
    q: Any = np.load(query, allow_pickle=False) if query.endswith(".npy") else query
    with mrlstore.open(path, read_only=True) as store:
        results = store.query(q, k=k, dims=_ints(dims), where=where)
        results = [results] if not isinstance(results, list) else results
        rows = [
            {"query": qi, "rank": rank + 1, "id": i, "score": float(score), **meta}
            for qi, hits in enumerate(results)
            for rank, (i, score, meta) in enumerate(zip(hits.ids, hits.scores, hits.metadata))
        ]
        _print_table(rows, as_json)


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@_reports_errors
def info(path: Path) -> None:
    """Configuration and state of the store at PATH (JSON)."""
    with mrlstore.open(path, read_only=True) as store:
        click.echo(json.dumps(store.info(), indent=2, default=str))


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.argument("statement")
@click.option("--json", "as_json", is_flag=True)
@_reports_errors
def sql(path: Path, statement: str, as_json: bool) -> None:
    """Run one SELECT over the store's metadata (table ``items``)."""
    with mrlstore.open(path, read_only=True) as store:
        _print_table(store.sql(statement).to_pylist(), as_json)


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option("--recall", type=float, default=0.95, show_default=True)
@click.option("-k", "--k", "k", type=int, default=10, show_default=True)
@_reports_errors
def tune(path: Path, recall: float, k: int) -> None:
    """Measure and save the cheapest funnel reaching RECALL@k."""
    with mrlstore.open(path) as store:
        t = store.tune(recall=recall, k=k)
        click.echo(f"tuned: dims={t['dims']} shortlist={t['shortlist']} recall={t['recall']:.3f} "
                   f"{t['ms_per_query']:.2f} ms/query")  # fmt: skip


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@_reports_errors
def compact(path: Path) -> None:
    """Rewrite the store at PATH without its deleted rows (crash-safe)."""
    with mrlstore.open(path) as store:
        counts = store.compact()
    click.echo(f"{counts['rows_before']} rows -> {counts['rows_after']}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@_reports_errors
def verify(path: Path) -> None:
    """Check the store's files against its commits; exit 1 listing what is wrong."""
    try:
        with mrlstore.open(path, read_only=True) as store:
            found = store.verify()
    except CorruptStoreError as e:  # too damaged to open: that is the finding
        found = [str(e)]
    if found:
        for problem in found:
            click.echo(f"problem: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{path}: consistent")


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--dims", type=int, help="Also write the first DIMS numbers of each vector.")
@_reports_errors
def export(path: Path, dest: Path, dims: int | None) -> None:
    """Write the live entries (id, metadata, optionally vectors) to a Parquet file DEST."""
    with mrlstore.open(path, read_only=True) as store:
        n = store.export_parquet(dest, dims=dims)
    click.echo(f"wrote {n} rows to {dest}")
