"""The complete command line, through the entry point ``python -m mrlstore`` runs (in this process,
tests/cli_support.py; in a subprocess where a process is what is checked: the AWS environment, permissions
dropped before the start, a full or read-only disk): vector adds with ids
and metadata that do not duplicate on a re-add, delete, snapshot, publish and the read commands on s3://
URLs (a moto server), one-line errors on bad paths and full or read-only disks, and an image add killed
part way that a re-run completes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_support import python_m_mrlstore, run_cli
from errors_support import without_root_file_access
from PIL import Image

import mrlstore

cli = run_cli  # the commands' code path, in this process; python_m_mrlstore runs a real process


def one_line_error(out: subprocess.CompletedProcess, code: int = 1) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stderr.startswith("error: "), out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    return out.stderr


@pytest.fixture
def vectors(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return x


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.mrl"
    assert cli("create", str(path), "--dim", "32", "--bands", "8,32", "--index-dims", "8").returncode == 0
    return path


def _count(store: Path) -> int:
    return json.loads(cli("sql", str(store), "SELECT count(*) AS n FROM items", "--json").stdout)[0]["n"]


def test_npy_adds_take_ids_and_metadata_and_skip_what_is_in(store, vectors, tmp_path):
    (tmp_path / "ids.txt").write_text("\n".join(f"v{i}" for i in range(40)))
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps({"label": f"l{i % 3}", "n": i}) + "\n" for i in range(40)))
    args = ("add", str(store), str(tmp_path / "x.npy"), "--ids", str(tmp_path / "ids.txt"))
    out = cli(*args, "--metadata", str(tmp_path / "meta.jsonl"))
    assert out.returncode == 0 and "added 40 vectors" in out.stdout, out.stderr
    out = cli(*args)
    assert out.returncode == 0 and "added 0 vectors, 40 already present" in out.stdout
    with mrlstore.open(store, read_only=True) as s:
        got = s.get(["v3", "v7"])
        assert got.column("label").to_pylist() == ["l0", "l1"] and got.column("n").to_pylist() == [3, 7]
        np.testing.assert_allclose(np.stack(got.column("vector").to_numpy(zero_copy_only=False))[0],
                                   vectors[3].astype(np.float16), rtol=0)  # fmt: skip
    one_line_error(cli(*args, "--on-conflict", "error"))
    out = cli(*args, "--on-conflict", "replace")  # it said "added 0 vectors, 40 already present"
    assert out.returncode == 0 and "added 0 vectors, 40 replaced" in out.stdout, out.stderr
    # without ids: ids hashed from the vectors, so the same file twice adds its rows once
    assert "added 40 vectors" in cli("add", str(store), str(tmp_path / "x.npy")).stdout
    assert "added 0 vectors, 40 already present" in cli("add", str(store), str(tmp_path / "x.npy")).stdout
    np.save(tmp_path / "twice.npy", np.concatenate([vectors[:3], vectors[:3]]) + 7)  # a row repeated, no ids
    out = cli("add", str(store), str(tmp_path / "twice.npy"))
    assert out.returncode == 0 and "added 3 vectors, 3 already present" in out.stdout, out.stderr
    assert _count(store) == 83


def test_parquet_adds_read_vector_id_and_metadata_columns(store, vectors, tmp_path):
    flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 32)
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(40)], "embedding": flat, "label": ["a"] * 40,
                             "extra": list(range(40))}), tmp_path / "t.parquet")  # fmt: skip
    pq.write_table(pa.table({"vec": flat, "k": list(range(40))}), tmp_path / "noid.parquet")
    out = cli("add", str(store), str(tmp_path / "t.parquet"), "--columns", "label")
    assert out.returncode == 0 and "added 40 vectors" in out.stdout, out.stderr
    assert "added 0 vectors, 40 already present" in cli("add", str(store), str(tmp_path / "t.parquet")).stdout
    noid = ("add", str(store), str(tmp_path / "noid.parquet"), "--vector-column", "vec")
    assert "added 40 vectors" in cli(*noid).stdout and "added 0 vectors" in cli(*noid).stdout
    with mrlstore.open(store, read_only=True) as s:
        assert len(s) == 80 and "extra" not in s.sql("SELECT * FROM items LIMIT 1").column_names
        assert s.get(["p5"]).column("label").to_pylist() == ["a"]
    out = cli("add", str(store), str(tmp_path / "t.parquet"), "--vector-column", "nope")
    assert out.returncode == 2 and "no column 'nope'" in out.stderr
    out = cli("add", str(store), str(tmp_path / "t.parquet"), "--columns", "label,nope")
    assert out.returncode == 2 and "no column 'nope'" in out.stderr
    assert "lists of numbers" in one_line_error(cli("add", str(store), str(tmp_path / "t.parquet"),
                                                    "--vector-column", "label"))  # fmt: skip
    tensors = pa.FixedShapeTensorArray.from_numpy_ndarray(vectors + 2)
    pq.write_table(pa.table({"t": tensors}), tmp_path / "tensor.parquet")  # no id column: hashed ids
    assert "added 40 vectors" in cli("add", str(store), str(tmp_path / "tensor.parquet"), "--vector-column", "t").stdout
    repeated = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([vectors, vectors[:3]]).ravel() + 5), 32)
    pq.write_table(pa.table({"embedding": repeated}), tmp_path / "repeats.parquet")  # 3 vectors twice, no ids
    out = cli("add", str(store), str(tmp_path / "repeats.parquet"))
    assert out.returncode == 0 and "added 40 vectors, 3 already present" in out.stdout, out.stderr


def test_unreadable_input_files_are_one_line_errors(store, vectors, tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("1 2 3\n")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "ids.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "meta.jsonl").write_text("{not json\n")
    for args in (
        ["add", str(store), str(tmp_path / "objects.npy")],
        ["add", str(store), str(tmp_path / "broken.parquet")],
        ["add", str(store), str(tmp_path / "x.npy"), "--ids", str(tmp_path / "ids.txt")],
        ["add", str(store), str(tmp_path / "x.npy"), "--metadata", str(tmp_path / "meta.jsonl")],
        ["query", str(store), str(tmp_path / "objects.npy")],
        ["add", str(store), str(tmp_path / "text.npy")],
    ):
        message = one_line_error(cli(*args))
        assert "pickled" not in message, message  # numpy's words for a text file or objects
    text = one_line_error(cli("add", str(store), str(tmp_path / "text.npy")))
    assert "not a .npy file" in text and "cannot read" not in text, text  # said once
    assert _count(store) == 0


def test_delete_and_snapshot(store, vectors, tmp_path):
    (tmp_path / "ids.txt").write_text("\n".join(f"v{i}" for i in range(40)))
    cli("add", str(store), str(tmp_path / "x.npy"), "--ids", str(tmp_path / "ids.txt"))
    out = cli("delete", str(store), "v1", "v2")
    assert out.returncode == 0 and "deleted 2" in out.stdout
    assert "not in the store" in one_line_error(cli("delete", str(store), "v1"))
    assert cli("delete", str(store), "v1", "v3", "--missing-ok").stdout.strip() == "deleted 1 entries"
    out = cli("snapshot", str(store), str(tmp_path / "copy.mrl"))
    assert out.returncode == 0, out.stderr
    assert _count(tmp_path / "copy.mrl") == 37
    assert "already exists" in one_line_error(cli("snapshot", str(store), str(tmp_path / "copy.mrl")))


def test_index_dims_builds_other_indexes(store, vectors, tmp_path):
    cli("add", str(store), str(tmp_path / "x.npy"))
    out = cli("index-dims", str(store), "16,8")
    assert out.returncode == 0, out.stderr
    assert "indexed prefixes: [8, 16]" in out.stdout and "16: 'loaded'" in out.stdout
    assert "index_dims must be distinct prefix lengths within 1..32" in one_line_error(
        cli("index-dims", str(store), "64")
    )
    with mrlstore.open(store, read_only=True) as s:
        assert s.index_dims == (8, 16) and len(s) == 40


def test_publish_and_read_commands_on_s3_urls(store, vectors, tmp_path, s3_endpoint):
    from mrlstore.tiers.objectstore import filesystem

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs, _ = filesystem("s3://cli-bucket", {**options, "allow_bucket_creation": True})
    fs.create_dir("cli-bucket")
    flags = [x for k, v in options.items() for x in ("--storage-option", f"{k}={v}")]
    (tmp_path / "ids.txt").write_text("\n".join(f"v{i}" for i in range(40)))
    cli("add", str(store), str(tmp_path / "x.npy"), "--ids", str(tmp_path / "ids.txt"))
    url = "s3://cli-bucket/photos"
    out = cli("publish", str(store), url, *flags)
    assert out.returncode == 0 and "published version 1 (40 live rows)" in out.stdout, out.stderr
    cache = {"MRLSTORE_CACHE": str(tmp_path / "cache")}
    info = json.loads(cli("info", url, *flags, env=cache).stdout)
    assert info["live"] == 40 and info["path"] == url
    np.save(tmp_path / "q.npy", vectors[5])
    hits = json.loads(cli("query", url, str(tmp_path / "q.npy"), "-k", "2", "--json", *flags, env=cache).stdout)
    assert hits[0]["id"] == "v5"
    assert json.loads(cli("sql", url, "SELECT count(*) AS n FROM items", "--json", *flags, env=cache).stdout) == [
        {"n": 40}
    ]
    out = cli("export", url, str(tmp_path / "out.parquet"), "--dims", "32", *flags, env=cache)
    assert out.returncode == 0 and pq.read_table(tmp_path / "out.parquet").num_rows == 40
    out = cli("verify", url, *flags, env=cache)
    assert out.returncode == 0 and "consistent" in out.stdout, out.stderr
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": s3_endpoint}
    assert json.loads(python_m_mrlstore("info", url, env={**cache, **aws}).stdout)["live"] == 40  # the AWS environment
    assert "no store published" in one_line_error(cli("info", "s3://cli-bucket/nothing", *flags, env=cache))
    bad = cli("info", url, "--storage-option", "oops")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_bad_places_give_one_line_errors(tmp_path):
    (tmp_path / "afile.txt").write_text("x")
    assert "does not accept new folders" in one_line_error(cli("create", "/proc/x.mrl"))
    assert "is a file, not a folder" in one_line_error(cli("create", str(tmp_path / "afile.txt" / "sub.mrl")))
    assert not (tmp_path / "afile.txt").is_dir()


def test_a_folder_without_permission_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)  # no write permission, even for its owner
    drop = without_root_file_access if os.geteuid() == 0 else None
    if drop is not None:
        try:
            subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop, check=True)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("root here cannot drop its file-access capabilities")
    elif os.access(locked, os.W_OK):
        pytest.skip("this file system ignores permission bits")
    out = python_m_mrlstore("create", str(locked / "x.mrl"), "--dim", "8", preexec_fn=drop)
    assert "permission denied" in one_line_error(out)
    assert not list(locked.iterdir())


@pytest.fixture
def small_disk(mount_tmpfs):
    return mount_tmpfs("3m")


def test_a_full_disk_is_one_line_and_commits_nothing_partial(small_disk, tmp_path):
    store = small_disk / "s.mrl"
    assert cli("create", str(store), "--dim", "64", "--bands", "16,64").returncode == 0
    np.save(tmp_path / "small.npy", np.random.default_rng(1).standard_normal((500, 64)).astype(np.float32))
    np.save(tmp_path / "big.npy", np.random.default_rng(2).standard_normal((40000, 64)).astype(np.float32))
    assert "added 500 vectors" in cli("add", str(store), str(tmp_path / "small.npy")).stdout
    message = one_line_error(python_m_mrlstore("add", str(store), str(tmp_path / "big.npy")))
    assert re.search("disk is full|No space left", message), message
    assert cli("verify", str(store)).returncode == 0
    assert _count(store) == 500


def test_a_read_only_disk_is_one_line(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert "read-only" in one_line_error(python_m_mrlstore("create", str(small_disk / "x.mrl"), "--dim", "8"))


@pytest.mark.slow
def test_an_image_add_killed_part_way_keeps_its_commits_and_a_rerun_completes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(160):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(photos / f"p{i:03d}.png")
    store = tmp_path / "s.mrl"
    assert python_m_mrlstore("create", str(store)).returncode == 0
    args = [sys.executable, "-m", "mrlstore", "add", str(store), str(photos), "--commit-every", "8"]
    args += ["--batch-size", "4"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen = b""
    while proc.poll() is None:  # the progress bar counts committed images: kill after the second commit
        seen += proc.stderr.read1(256)
        done = [int(n) for n in re.findall(rb"(\d+)/160", seen)]
        if done and max(done) >= 16:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the add finished before the kill: give it more images"
    with mrlstore.open(store, read_only=True) as s:
        kept = len(s)
        assert 16 <= kept < 160 and kept % 8 == 0 and s.verify() == []
    out = python_m_mrlstore("add", str(store), str(photos), "--commit-every", "8")
    assert out.returncode == 0 and f"added {160 - kept} images, {kept} already present" in out.stdout, out.stderr
    assert "loading the image encoder" in out.stderr  # said before the few silent seconds torch takes
    with mrlstore.open(store, read_only=True) as s:
        paths = s.sql("SELECT path FROM items").column("path").to_pylist()
        assert len(s) == 160 and sorted(paths) == sorted(str(p) for p in photos.iterdir()) and s.verify() == []
