"""The command line: ``mrlstore`` (console script) and ``python -m mrlstore``.

Exit codes: 0 success, 1 an error the store or the file system reports (printed on one line), 2 a usage
error (click's convention), 130 interrupted. Read commands take a local store or an ``s3://`` URL where
``publish`` uploaded one (credentials from ``--storage-option`` or the AWS environment).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import select
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa

import mrlstore
from mrlstore._fsutil import is_url
from mrlstore.errors import CorruptStoreError, InvalidInputError, MRLStoreError, StoreNotFoundError
from mrlstore.inputs.vectors import first_positions
from mrlstore.tiers.catalog import DB_FILE

VECTOR_SUFFIXES = (".npy",)
TABLE_SUFFIXES = (".parquet", ".pq")


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _reports_errors(fn: Any) -> Any:
    """Store and file-system errors become one line on stderr and exit status 1; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError as e:
            if not _stdout_gone():  # a connection, say to object storage: an error like any other
                _fail(f"{e.strerror or e}")
            # whoever read the output stopped (`| head`): nothing to say, as git does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            sys.exit(141)
        except MRLStoreError as e:
            _fail(str(e))
        except OSError as e:  # what the library leaves to the OS: a path it was handed, a full disk
            _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e))
        except KeyboardInterrupt:
            click.echo("interrupted (every commit made before it stays)", err=True)
            sys.exit(130)
        except click.ClickException:
            raise
        except Exception as e:  # an input file numpy or Arrow cannot read, and anything else: still one line
            if os.environ.get("MRLSTORE_DEBUG"):
                raise
            _fail(f"{type(e).__name__}: {e} (MRLSTORE_DEBUG=1 shows the traceback)")

    return run


def _stdout_gone() -> bool:
    """Whether the broken pipe is standard output (a pipe whose reader exited polls as an error)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):
        return False


def _fail(message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)  # one line, whatever the message holds
    sys.exit(1)


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
    text = f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)
    return text if text.isprintable() else repr(text)[1:-1]  # a newline in a file name split its row


def _options(pairs: tuple[str, ...]) -> dict[str, str] | None:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        out[key] = value
    return out or None


class StorePath(click.ParamType):
    """A local store folder or an ``s3://`` URL (checked when opened: a missing one is an error, exit 1)."""

    name = "STORE"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        return str(value)


STORE = StorePath()
storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="For s3:// URLs: key, secret, endpoint_url, region, ... (default: the AWS environment).",
)  # fmt: skip


def _check_local(path: str) -> None:
    """A local path names a store: ``mrlstore.open`` would make a 2048-d store in an empty folder, and an add
    of 64-d vectors would fail after it."""
    if not is_url(str(path)) and not (Path(path) / DB_FILE).is_file():
        what = "is not a store" if Path(path).exists() else "does not exist"
        raise StoreNotFoundError(f"{path} {what}: make one first with `mrlstore create {path}` (--dim for vectors)")


@contextmanager
def _writing(path: str) -> Iterator[mrlstore.Store]:
    """The store at ``path``, opened to change it."""
    _check_local(path)
    with mrlstore.open(path) as s:
        yield s


@contextmanager
def _reading(store: str, storage_options: tuple[str, ...] = ()) -> Iterator[mrlstore.Store]:
    _check_local(store)
    with mrlstore.open(store, read_only=True, storage_options=_options(storage_options)) as s:
        yield s


def _announce_encoder(store: mrlstore.Store) -> None:
    if store.info()["encoder"] == "bundled":
        click.echo("loading the image encoder (torch, a few seconds)...", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mrlstore.__version__, prog_name="mrlstore")
def main() -> None:
    """mrlstore: a Matryoshka embeddings store (Zarr bands, HNSW prefixes, DuckDB metadata)."""


@main.command()
@click.argument("path")  # a string: a URL must reach open() as one (Path("s3://b/x") is the folder "s3:/b/x")
@click.option("--dim", type=int, help="Vector length (default: 2048, for the bundled image encoder).")
@click.option("--bands", help="Band ends, e.g. 16,64,256,2048.")
@click.option("--index-dims", help="Prefixes with an HNSW index, e.g. 16,32.")
@click.option("--metric", type=click.Choice(["cosine", "ip", "l2"]))
@click.option("--dtype", type=click.Choice(["float16", "float32"]))
@click.option("--prefixes", type=click.Choice(["auto", "raw"]),
              help="auto (default): tune may fit short codes to the rows; raw: never.")  # fmt: skip
@_reports_errors
def create(path: str, dim: int | None, bands: str | None, index_dims: str | None, metric: str | None,
           dtype: str | None, prefixes: str | None) -> None:  # fmt: skip
    """Create a store at PATH."""
    if "://" not in path and (Path(path) / "catalog.duckdb").exists():
        raise click.UsageError(f"{path} already holds a store")
    with mrlstore.open(
        path, dim, bands=_ints(bands), index_dims=_ints(index_dims), metric=metric, dtype=dtype, prefixes=prefixes
    ) as s:
        click.echo(f"created {s.path}: dim={s.dim} bands={list(s.bands)} index_dims={list(s.index_dims)}")


@main.command()
@click.argument("path")  # a string: Path("s3://b/x") would be the folder "s3:/b/x"
@click.argument("inputs", nargs=-1, required=True)
@click.option("--skip-errors", is_flag=True, help="Leave out unreadable images (listed) instead of failing.")
@click.option("--on-conflict", type=click.Choice(["skip", "replace", "error"]), default="skip", show_default=True,
              help="For ids already in the store (images: same content; vectors: same ids).")  # fmt: skip
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per encoder batch.")
@click.option("--commit-every", type=int, default=1024, show_default=True,
              help="Images per commit: an interrupted add keeps its commits; run it again to resume.")  # fmt: skip
@click.option("--atomic", is_flag=True, help="Images: encode everything, then commit once (all or nothing).")
@click.option("--ids", "ids_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help=".npy: a text file with one id per row (default: a hash of each vector).")  # fmt: skip
@click.option("--metadata", "metadata_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help=".npy: metadata, one row per vector (.parquet, .csv or .jsonl).")  # fmt: skip
@click.option("--vector-column", default="embedding", show_default=True, help="Parquet: the vector column.")
@click.option("--id-column", help="Parquet: the id column (default: 'id' if present, else a hash of each vector).")
@click.option("--columns", help="Parquet: only these metadata columns (comma-separated; default all).")
@_reports_errors
def add(path: str, inputs: tuple[str, ...], skip_errors: bool, on_conflict: str, batch_size: int, commit_every: int,
        atomic: bool, ids_file: Path | None, metadata_file: Path | None, vector_column: str, id_column: str | None,
        columns: str | None) -> None:  # fmt: skip
    """Add images (files and folders), vectors (.npy: one per row) or a Parquet table to the store at PATH.

    Adding the same inputs again adds nothing: images and vectors without ids get ids hashed from their
    content, and ids already in the store are skipped (--on-conflict)."""
    vectors = [i for i in inputs if i.lower().endswith(VECTOR_SUFFIXES)]
    tables = [i for i in inputs if i.lower().endswith(TABLE_SUFFIXES)]
    images = [i for i in inputs if i not in vectors and i not in tables]
    if (ids_file or metadata_file) and (len(vectors) != 1 or tables or images):
        raise click.UsageError("--ids and --metadata go with exactly one .npy file")
    with _writing(path) as store:
        for f in vectors:
            _add_npy(store, Path(f), ids_file, metadata_file, on_conflict)
        for f in tables:
            _add_parquet(store, Path(f), vector_column, id_column, columns, on_conflict)
        if images:
            _announce_encoder(store)
            result = store.add(images, skip_errors=skip_errors, on_conflict=on_conflict, batch_size=batch_size,
                               commit_every=commit_every, atomic=atomic, progress=True)  # fmt: skip
            replaced = f", replaced {len(result.replaced)}" if result.replaced else ""
            click.echo(f"added {len(result.added) - len(result.replaced)} images{replaced}, "
                       f"{len(result.skipped)} already present, {len(result.failed)} failed")  # fmt: skip
            for failure in result.failed:
                click.echo(f"  skipped {failure.source}: {failure.reason}", err=True)


def _add_npy(store: mrlstore.Store, f: Path, ids_file: Path | None, metadata_file: Path | None,
             on_conflict: str) -> None:  # fmt: skip
    x = _load_npy(f)
    x = x[None, :] if x.ndim == 1 else x
    ids = ids_file.read_text().splitlines() if ids_file else _vector_ids(x)
    meta = _read_metadata(metadata_file) if metadata_file else None
    given = len(ids)  # a row repeated in the file counts as present, as in a Parquet file
    ids, x, meta = _first_of_each(ids, x, meta) if not ids_file else (ids, x, meta)
    before = len(store)
    store.add_vectors(x, ids=ids, metadata=meta, on_conflict=on_conflict)
    _say_added(f, len(store) - before, given, on_conflict)


def _say_added(f: Path, new: int, given: int, on_conflict: str) -> None:
    """How many rows of ``f`` are new; the others replaced entries, or were already present (skipped)."""
    others = "replaced" if on_conflict == "replace" else "already present"
    click.echo(f"{f}: added {new} vectors, {given - new} {others}")


def _load_npy(f: Path) -> np.ndarray:
    """The array of a .npy file; one of objects, or a file that is no .npy, is a clear error (numpy says a
    text file "contains pickled data")."""
    with open(f, "rb") as stream:
        if stream.read(6) != b"\x93NUMPY":
            raise InvalidInputError(f"{f} is not a .npy file (np.save writes one): it lacks the NUMPY header")
    try:
        return np.load(f, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise InvalidInputError(f"{f} holds Python objects, not numbers: save the vectors as numbers") from None
        raise InvalidInputError(f"cannot read {f}: {e}") from None


def _vector_ids(x: np.ndarray) -> list[str]:
    """Ids hashed from each vector's float32 values: the same vectors get the same ids."""
    rows = np.ascontiguousarray(x, dtype=np.float32) if x.dtype.kind in "fiu" else x
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in rows]


def _first_of_each(ids: list[str], x: np.ndarray, meta: Any) -> tuple[list[str], np.ndarray, Any]:
    keep = first_positions(ids)
    if len(keep) == len(ids):
        return ids, x, meta
    rows = np.array(keep)
    return [ids[p] for p in keep], x[rows], None if meta is None else meta.take(rows)


def _read_metadata(f: Path) -> Any:
    suffix = f.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        import pyarrow.parquet as pq

        return pq.read_table(f)
    if suffix == ".csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(f)
    if suffix in (".jsonl", ".ndjson", ".json"):
        import pyarrow.json as pjson

        return pjson.read_json(f)
    raise click.BadParameter(f"metadata must be .parquet, .csv or .jsonl, got {f.name}", param_hint="--metadata")


def _add_parquet(store: mrlstore.Store, f: Path, vector: str, id_column: str | None, columns: str | None,
                 on_conflict: str) -> None:  # fmt: skip
    import pyarrow.parquet as pq

    source = pq.ParquetFile(f, pre_buffer=False)
    names = source.schema_arrow.names
    for name, what in ((vector, "--vector-column"), (id_column, "--id-column")):
        if name is not None and name not in names:
            raise click.BadParameter(f"{f} has no column {name!r} (columns: {', '.join(names)})", param_hint=what)
    wanted = [] if columns is None else columns.split(",")
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise click.BadParameter(f"{f} has no column {unknown[0]!r} (columns: {', '.join(names)})",
                                 param_hint="--columns")  # fmt: skip
    id_column = id_column or ("id" if "id" in names else None)
    keep = None if columns is None else [vector, *([id_column] if id_column else []), *wanted]
    batches = source.iter_batches(columns=keep)
    if id_column is None:
        batches, id_column = _with_hash_ids(batches, vector), "_content_id"
    before = len(store)
    store.add_arrow(batches, vector=vector, id=id_column, on_conflict=on_conflict)
    _say_added(f, len(store) - before, source.metadata.num_rows, on_conflict)


def _with_hash_ids(batches: Iterator[Any], vector: str) -> Iterator[Any]:
    """Each batch with a ``_content_id`` column hashed from its vectors (as ``_vector_ids``), a vector
    repeated within the batch kept once (as a .npy add does)."""
    from mrlstore.inputs.arrow import to_matrix  # every vector column the library takes, checked the same way

    for batch in batches:
        ids = _vector_ids(to_matrix(batch.column(vector))) if batch.num_rows else []
        keep = first_positions(ids)
        batch = batch.append_column("_content_id", _string_array(ids))
        yield batch if len(keep) == len(ids) else batch.take(keep)


def _string_array(values: list[str]) -> pa.Array:

    return pa.array(values, pa.string())


@main.command()
@click.argument("store", type=STORE)
@click.argument("query", required=False)
@click.option("--id", "ids", multiple=True,
              help="Instead of QUERY: the entries like the stored entry ID, itself left out (repeatable).")  # fmt: skip
@click.option("-k", "--k", "k", type=int, default=10, show_default=True)
@click.option("--dims", help="The funnel, e.g. 16,2048 (default: the tuned setting).")
@click.option("--where", help="A DuckDB filter over the metadata, e.g. \"label = 'cat'\".")
@click.option("--prefixes", type=click.Choice(["raw", "fitted"]),
              help="Shortlist on raw prefixes or fitted codes (default: the store's choice).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@storage_option
@_reports_errors
def query(store: str, query: str | None, ids: tuple[str, ...], k: int, dims: str | None, where: str | None,
          prefixes: str | None, as_json: bool, storage_options: tuple[str, ...]) -> None:  # fmt: skip
    """Query STORE with an image file or folder, a .npy vector (1-D, or 2-D for several), or --id."""
    if (query is None) == (not ids):
        raise click.UsageError("give QUERY (an image or a .npy file) or --id, not both")
    with _reading(store, storage_options) as s:
        if ids:
            results: Any = s.similar(list(ids), k=k, dims=_ints(dims), where=where, prefixes=prefixes)
        else:
            assert query is not None
            q: Any = _load_npy(Path(query)) if query.lower().endswith(VECTOR_SUFFIXES) else query
            if isinstance(q, str):
                _announce_encoder(s)
            results = s.query(q, k=k, dims=_ints(dims), where=where, prefixes=prefixes)
        results = [results] if not isinstance(results, list) else results
        rows = [
            {"query": qi, "rank": rank + 1, "id": i, "score": float(score), **meta}
            for qi, hits in enumerate(results)
            for rank, (i, score, meta) in enumerate(zip(hits.ids, hits.scores, hits.metadata))
        ]
        _print_table(rows, as_json)


@main.command()
@click.argument("store", type=STORE)
@storage_option
@_reports_errors
def info(store: str, storage_options: tuple[str, ...]) -> None:
    """Configuration and state of STORE (JSON)."""
    with _reading(store, storage_options) as s:
        click.echo(json.dumps(dict(s.info()), indent=2, default=str))


@main.command()
@click.argument("store", type=STORE)
@click.argument("statement")
@click.option("--json", "as_json", is_flag=True)
@storage_option
@_reports_errors
def sql(store: str, statement: str, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Run one SELECT over the metadata of STORE (table ``items``)."""
    with _reading(store, storage_options) as s:
        _print_table(s.sql(statement).to_pylist(), as_json)


@main.command()
@click.argument("path")  # a string: Path("s3://b/x") would be the folder "s3:/b/x"
@click.option("--recall", type=float, default=0.95, show_default=True)
@click.option("-k", "--k", "k", type=int, default=10, show_default=True)
@_reports_errors
def tune(path: str, recall: float, k: int) -> None:
    """Measure and save the cheapest funnel reaching RECALL@k."""
    with _writing(path) as store:
        t = store.tune(recall=recall, k=k)
        measured = f"recall={t['recall']:.3f} {t['ms_per_query']:.2f} ms/query"
        d = t["dims"][0]
        coded = store.index_status.get(d) == "fitted code"  # its raw index replaced by the fit's codes
        fitted = t["prefixes"] == "fitted" and coded
        if len(t["dims"]) == 1 and not fitted and (d == store.dim or d not in store.index_dims or coded):
            click.echo(f"tuned: exact search of the first {d} numbers (dims=[{d}]) {measured}: faster than any funnel")
        else:  # as Funnel.is_exact tells a scan from a search
            codes = "fitted codes" if fitted else "raw prefixes"
            click.echo(f"tuned: dims={t['dims']} shortlist={t['shortlist']} {measured}, shortlisting on {codes}")


@main.command("index-dims")
@click.argument("path")  # a string: Path("s3://b/x") would be the folder "s3:/b/x"
@click.argument("dims")
@_reports_errors
def index_dims(path: str, dims: str) -> None:
    """Index the prefixes DIMS (comma-separated, e.g. 32,128) of the store at PATH instead of its current ones,
    building the new indexes from its rows; run `mrlstore tune` again afterwards."""
    with _writing(path) as store:
        store.set_index_dims(_ints(dims) or [])
        click.echo(f"indexed prefixes: {list(store.index_dims)} ({store.index_status})")


@main.command()
@click.argument("store", type=STORE)
@click.option("-k", "--k", "k", type=int, default=10, show_default=True)
@click.option("--sample", type=int, default=200, show_default=True, help="Of the store's rows, used as queries.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), help="Also draw it as a PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@storage_option
@_reports_errors
def report(store: str, k: int, sample: int, plot: Path | None, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """How recall and latency change with dims and shortlist on STORE's own rows (how many dims you need)."""
    with _reading(store, storage_options) as s:
        table = s.report(k=k, sample=sample)
    _print_table(table.to_pylist(), as_json)
    if plot is not None:
        from mrlstore.integrations.plots import plot_dims_report

        plot_dims_report(table, plot)
        click.echo(f"wrote {plot}", err=True)


@main.command()
@click.argument("path")  # a string: Path("s3://b/x") would be the folder "s3:/b/x"
@_reports_errors
def compact(path: str) -> None:
    """Rewrite the store at PATH without its deleted rows (crash-safe)."""
    with _writing(path) as store:
        counts = store.compact()
    click.echo(f"{counts['rows_before']} rows -> {counts['rows_after']}")


@main.command()
@click.argument("path")  # a string: Path("s3://b/x") would be the folder "s3:/b/x"
@click.argument("ids", nargs=-1, required=True)
@click.option("--missing-ok", is_flag=True, help="Ignore ids that are not in the store.")
@_reports_errors
def delete(path: str, ids: tuple[str, ...], missing_ok: bool) -> None:
    """Delete the entries IDS from the store at PATH."""
    with _writing(path) as store:
        n = store.delete(list(ids), missing_ok=missing_ok)
    click.echo(f"deleted {n} entries")


@main.command()
@click.argument("path")  # a string: Path("s3://b/x") would be the folder "s3:/b/x"
@click.argument("dest")  # text: a URL is refused by the store, never made a local folder
@_reports_errors
def snapshot(path: str, dest: str) -> None:
    """Write a consistent copy of the store at PATH to DEST (a new folder)."""
    with _reading(path) as store:
        written = store.snapshot(dest)
    click.echo(f"wrote a snapshot to {written}")


@main.command()
@click.argument("path")  # a string: Path("s3://b/x") would be the folder "s3:/b/x"
@click.argument("url")
@storage_option
@_reports_errors
def publish(path: str, url: str, storage_options: tuple[str, ...]) -> None:
    """Upload the store at PATH to object storage (s3://bucket/prefix) as a new version."""
    with _reading(path) as store:
        head = store.publish(url, storage_options=_options(storage_options))
    click.echo(f"published version {head['version']} ({head['live_rows']} live rows) to {url}")


@main.command()
@click.argument("store", type=STORE)
@click.option("--full", is_flag=True, help="Check every row's values against its stored norms (reads every vector).")
@storage_option
@_reports_errors
def verify(store: str, full: bool, storage_options: tuple[str, ...]) -> None:
    """Check the files of STORE against its commits; exit 1 listing what is wrong."""
    try:
        with _reading(store, storage_options) as s:
            found = s.verify(full=full)
    except CorruptStoreError as e:  # too damaged to open: that is the finding
        found = [str(e)]
    if found:
        for problem in found:
            click.echo(f"problem: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{store}: consistent")


@main.command()
@click.argument("store", type=STORE)
@click.argument("dest")  # text: a URL is refused by the store, never made a local folder
@click.option("--dims", type=int, help="Also write the first DIMS numbers of each vector.")
@storage_option
@_reports_errors
def export(store: str, dest: str, dims: int | None, storage_options: tuple[str, ...]) -> None:
    """Write the live entries of STORE (id, metadata, optionally vectors) to a Parquet file DEST."""
    with _reading(store, storage_options) as s:
        n = s.export_parquet(dest, dims=dims)
    click.echo(f"wrote {n} rows to {dest}")
