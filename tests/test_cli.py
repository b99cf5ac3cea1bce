"""The command line, through the entry point ``python -m mrlstore`` runs (in this process, tests/cli_support.py;
in a subprocess where a process is what is checked: its exit status, a pipe closed early), and the store
methods it drives: verify, export, snapshots that stay sparse, a light install without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_support import python_m_mrlstore, run_cli

import mrlstore

cli = run_cli  # the commands' code path, in this process; python_m_mrlstore runs a real process


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    np.save(root / "x.npy", x)
    np.save(root / "q.npy", x[7])
    return root, x


def test_help_everywhere_and_usage_errors_exit_2():
    out = python_m_mrlstore("--help")
    assert out.returncode == 0 and "create" in out.stdout and "verify" in out.stdout
    for command in ("create", "add", "query", "info", "sql", "tune", "compact", "verify", "export", "delete",
                    "snapshot", "publish"):  # fmt: skip
        assert cli(command, "--help").returncode == 0, command
    assert cli("query").returncode == 2  # missing arguments
    assert cli("nonsense").returncode == 2
    assert python_m_mrlstore("nonsense").returncode == 2  # as a process exits


def test_a_session_from_create_to_export(vectors, tmp_path):
    root, x = vectors
    store = str(tmp_path / "s.mrl")
    assert cli("create", store, "--dim", "64", "--bands", "16,64", "--index-dims", "16").returncode == 0
    out = cli("add", store, str(root / "x.npy"))
    assert out.returncode == 0 and "added 300 vectors" in out.stdout, out.stderr
    out = cli("query", store, str(root / "q.npy"), "-k", "3", "--dims", "16,64", "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert len(hits) == 3 and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    with mrlstore.open(store, read_only=True) as s:
        assert hits[0]["id"] == s.query(x[7], k=1, dims=[16, 64]).ids[0]
    table = cli("query", store, str(root / "q.npy"), "-k", "2")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["query", "rank", "id", "score"]
    info = json.loads(cli("info", store).stdout)
    assert info["live"] == 300 and info["dim"] == 64
    out = cli("sql", store, "SELECT count(*) AS n FROM items", "--json")
    assert json.loads(out.stdout) == [{"n": 300}]
    out = cli("tune", store, "--recall", "0.9")
    assert out.returncode == 0, out.stderr
    with mrlstore.open(store, read_only=True) as s:  # on 300 rows a scan often wins: said as one
        dims = s.manifest["tuned"]["dims"]
        scan = len(dims) == 1 and (dims[0] == 64 or dims[0] not in s.index_dims)
    said = f"exact search of the first {dims[0]} numbers" if scan else f"dims={dims} shortlist="
    assert out.stdout.startswith(f"tuned: {said}"), out.stdout
    assert "consistent" in cli("verify", store).stdout and "consistent" in cli("verify", store, "--full").stdout
    assert cli("compact", store).stdout.strip() == "300 rows -> 300"
    out = cli("export", store, str(tmp_path / "out.parquet"), "--dims", "16")
    assert out.returncode == 0 and "wrote 300 rows" in out.stdout
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.num_rows == 300 and t.schema.field("vector").type.list_size == 16


def test_store_errors_exit_1_with_one_line(vectors, tmp_path):
    root, _ = vectors
    store = str(tmp_path / "s.mrl")
    cli("create", store, "--dim", "64", "--bands", "16,64", "--index-dims", "16")
    out = python_m_mrlstore("sql", store, "DELETE FROM items")  # as a process exits
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    out = cli("add", store, str(root / "missing.jpg"))  # in this process: torch takes seconds to load in a new one
    assert out.returncode == 1 and "error: " in out.stderr and "Traceback" not in out.stderr
    out = python_m_mrlstore("create", "s3://bucket/x.mrl", "--dim", "8", cwd=tmp_path)
    assert out.returncode == 1 and "read-only" in out.stderr
    assert not (tmp_path / "s3:").exists()  # refused before anything touched the disk


def test_commands_refuse_a_folder_without_a_store_and_a_missing_path(vectors, tmp_path):
    """Only `create` makes a store: `add` into an empty folder made a 2048-d store there, and then failed
    on 64-d vectors. A missing path is one line and exit 1, as the README says, for every command."""
    root, _ = vectors
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (("add", empty, root / "x.npy"), ("tune", empty), ("delete", empty, "a"), ("compact", empty),
                 ("index-dims", empty, "16"), ("info", empty), ("snapshot", empty, tmp_path / "c")):  # fmt: skip
        out = cli(*map(str, args))
        assert out.returncode == 1 and "is not a store" in out.stderr and "mrlstore create" in out.stderr, args
        assert len(out.stderr.splitlines()) == 1 and not any(empty.iterdir()), args
    for command in ("add", "tune", "compact", "info", "verify", "query"):
        out = cli(
            command, str(tmp_path / "nowhere.mrl"), *([str(root / "x.npy")] if command in ("add", "query") else [])
        )
        assert out.returncode == 1 and "does not exist" in out.stderr and len(out.stderr.splitlines()) == 1, command
    assert not (tmp_path / "nowhere.mrl").exists()
    for command in ("add", "compact", "delete"):  # a URL stays a URL (a Path made it the folder "s3:/b/x")
        out = cli(
            command,
            "s3://bucket/x.mrl",
            *([str(root / "x.npy")] if command == "add" else ["a"] * (command == "delete")),
            cwd=tmp_path,
        )
        assert out.returncode == 1 and "read-only" in out.stderr and not (tmp_path / "s3:").exists(), command


def _zeroed(x: np.ndarray, path: Path, chunk: str, span) -> Path:
    """A 64-d store of ``x`` at ``path`` whose chunk file ``chunk`` has its bytes ``span(data_offset,
    size)`` zeroed (data_offset: where its rows start, after a version 3 shard index); returns the file."""
    with mrlstore.open(path, dim=64, bands=(16, 64), index_dims=(16,), chunk_rows=128) as s:
        s.add_vectors(x)
        assert s.verify() == []
        start = next(a.data_offset for a in s._state.vectors.arrays if (path / chunk).is_relative_to(a.dir))
    data = bytearray((path / chunk).read_bytes())
    lo, hi = span(start, len(data))
    data[lo:hi] = bytes(hi - lo)
    (path / chunk).write_bytes(bytes(data))
    return path / chunk


def test_verify_finds_a_lost_chunk_and_zeroed_rows(vectors, tmp_path):
    _, x = vectors
    path = tmp_path / "s"
    # the chunk's rows read as zeros, like a chunk Zarr never wrote
    chunk = _zeroed(x, path, "vectors/band_00000_00016/c/1/0", lambda start, size: (start, size))
    with mrlstore.open(path, read_only=True) as s:
        found = s.verify()
    assert any("all zeros" in p for p in found), found
    with mrlstore.open(path, read_only=True) as s:
        chunk.unlink()  # while the store is open: its memory maps still hold the pages
        assert any("is missing" in p for p in s.verify())
    out = cli("verify", str(path))
    assert out.returncode == 1 and "problem:" in out.stderr


def test_verify_finds_a_shard_index_that_lost_its_entries(vectors, tmp_path):
    # inner chunk 0 listed at offset 0, length 0: Zarr would read the wrong bytes
    _zeroed(vectors[1], tmp_path / "s", "vectors/band_00016_00064/c/1/0", lambda start, size: (0, 16))
    out = cli("verify", str(tmp_path / "s"))
    assert out.returncode == 1 and "shard index" in out.stderr and "misplaces 1 inner chunk" in out.stderr


def test_verify_finds_row_norms_that_disagree_with_the_vectors(vectors, tmp_path):
    # rows 0-39 (two float32 norms each) lose their norms
    _zeroed(vectors[1], tmp_path / "s", "vectors/row_norms/c/0/0", lambda start, size: (start, start + 8 * 40))
    with mrlstore.open(tmp_path / "s", read_only=True) as s:
        found = s.verify()
    assert any("row_norms disagree" in p for p in found), found


def test_export_keeps_ids_metadata_and_vectors(tmp_path):
    x = np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=32, bands=(8, 32), index_dims=(8,)) as s:
        s.add_vectors(x, ids=[f"r{i}" for i in range(20)], metadata=[{"n": i} for i in range(20)])
        s.delete(["r3"])
        assert s.export_parquet(tmp_path / "a.parquet", dims=32) == 19
        assert s.export_parquet(tmp_path / "b.parquet") == 19
    t = pq.read_table(tmp_path / "a.parquet")
    assert "r3" not in t.column("id").to_pylist() and t.column("n").to_pylist()[:3] == [0, 1, 2]
    got = np.array(t.column("vector").to_pylist(), np.float32)
    np.testing.assert_allclose(got, np.delete(x, 3, axis=0).astype(np.float16).astype(np.float32))
    assert pq.read_table(tmp_path / "b.parquet").column_names == ["id", "n"]


def _disk_bytes(root: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in root.rglob("*") if p.is_file())


def test_a_snapshot_stays_as_small_as_the_store(tmp_path):
    x = np.random.default_rng(2).standard_normal((60, 2048)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=2048) as s:  # preallocated chunk files, mostly holes
        s.add_vectors(x)
        s.snapshot(tmp_path / "snap")
    source, copy = _disk_bytes(tmp_path / "s"), _disk_bytes(tmp_path / "snap")
    assert copy <= 1.1 * source, (source, copy)
    with mrlstore.open(tmp_path / "snap", read_only=True) as s:
        assert s.query(x[5], k=1).ids == s.query(x[5], k=1, dims=[2048]).ids


def _image_add_error(tmp_path, prelude: str, before_add: str = "") -> subprocess.CompletedProcess:
    """A fresh process: ``prelude``, then a store for the bundled encoder, ``before_add`` (lines run with
    ``s`` open), and an image add whose EncoderUnavailableError is printed after "ERROR"."""
    code = f"""{prelude}
import numpy as np, mrlstore
with mrlstore.open({str(tmp_path / "s")!r}) as s:  # a store for the bundled encoder
{textwrap.indent(before_add, "    ")}
    try:
        s.add(np.zeros((8, 8, 3), np.uint8))
    except mrlstore.EncoderUnavailableError as e:
        print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out


def test_vectors_work_without_torch_or_pillow_and_images_say_what_to_install(tmp_path):
    prelude = """
import sys
sys.modules["torch"] = None  # an install without the image extra
sys.modules["PIL"] = None
"""
    vectors = """
x = np.random.default_rng(0).standard_normal((50, 2048)).astype(np.float32)
s.add_vectors(x)
assert s.query(x[3], k=1).ids == s.query(x[3], k=1, dims=[2048]).ids
"""
    out = _image_add_error(tmp_path, prelude, vectors)
    assert "pip install 'mrlstore[images]'" in out.stdout


def test_a_torch_that_fails_to_import_is_not_called_missing(tmp_path):
    """A torch whose import failed (broken, or its first import interrupted by Ctrl-C) was reported as "not
    installed", with advice to install it."""
    prelude = """
import sys, importlib.abc
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            raise ImportError("cannot import name 'nn' from partially initialized module 'torch'", name="torch")
sys.meta_path.insert(0, Broken())
"""
    out = _image_add_error(tmp_path, prelude)
    assert "could not be loaded" in out.stdout and "partially initialized" in out.stdout
    assert "not installed" not in out.stdout


def test_output_cut_short_by_a_pipe_is_silent(vectors, tmp_path):
    """`mrlstore sql ... | head -1` printed `error: Broken pipe` when head stopped reading."""
    root, _ = vectors
    store = str(tmp_path / "s.mrl")
    assert cli("create", store, "--dim", "64", "--bands", "16,64", "--index-dims", "16").returncode == 0
    assert cli("add", store, str(root / "x.npy")).returncode == 0
    command = f"{sys.executable} -m mrlstore sql {store} 'SELECT repeat(id, 300) AS r FROM items' | head -c 10"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True)
    assert len(out.stdout) == 10 and out.stderr == "" and out.returncode in (0, 141), (out.returncode, out.stderr)


@pytest.mark.parametrize("command", ["snapshot", "export"])
def test_a_url_destination_is_refused_in_one_line_and_makes_no_local_folder(vectors, tmp_path, command):
    """click's Path made s3://b/x the local s3:/b/x: DuckDB then asked for its httpfs extension, Arrow for a
    bucket, and a stray folder s3: stayed behind."""
    store = tmp_path / "s.mrl"
    with mrlstore.open(store, dim=64, bands=(16, 64), index_dims=(16,)) as s:
        s.add_vectors(vectors[1][:20])
    result = cli(command, str(store), "s3://bucket/copy", cwd=tmp_path)
    assert result.returncode == 1 and "is a URL" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "s3:").exists()
    with mrlstore.open(store, read_only=True) as s, pytest.raises(mrlstore.UnsupportedStorageError):
        s.snapshot("s3://bucket/copy")


def test_a_newline_in_a_value_keeps_the_table_one_row_per_line(vectors, tmp_path):
    """A file name with a newline (legal on Linux) split its row across two lines of the table."""
    store = str(tmp_path / "s.mrl")
    assert cli("create", store, "--dim", "64").returncode == 0
    out = cli("sql", store, "SELECT 'a' || chr(10) || 'b.jpg' AS path, 'plain' AS other")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["path      other", "a\\nb.jpg  plain"]
    out = cli("sql", store, "SELECT 'a' || chr(10) || 'b.jpg' AS path", "--json")
    assert json.loads(out.stdout) == [{"path": "a\nb.jpg"}]


def test_query_by_id_prints_the_entries_like_it(vectors, tmp_path):
    root, x = vectors
    store = str(tmp_path / "s.mrl")
    assert cli("create", store, "--dim", "64", "--bands", "16,64", "--index-dims", "16").returncode == 0
    assert cli("add", store, str(root / "x.npy")).returncode == 0
    with mrlstore.open(store, read_only=True) as s:
        first = s.sql("SELECT id FROM items LIMIT 1").column("id").to_pylist()[0]
        want = s.similar(first, k=3).ids
    out = cli("query", store, "--id", first, "-k", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert [hit["id"] for hit in json.loads(out.stdout)] == want and first not in want
    assert cli("query", store).returncode == 2 and "or --id" in cli("query", store).stderr
    assert cli("query", store, str(root / "q.npy"), "--id", first).returncode == 2
    out = cli("query", store, "--id", "nope")
    assert out.returncode == 1 and "not in the store" in out.stderr
