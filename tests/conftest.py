from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import errors_support
import numpy as np
import pytest

import mrlstore
from mrlstore.tiers import projection


@pytest.fixture(autouse=True)
def quick_code_training(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune's code fitting trains TRAIN_STEPS (100) steps, most of a small store's tune; tests of what tune
    and the funnel do with codes train 10. Tests marked ``full_fit`` (and compare.py) measure the fit as
    users get it."""
    if request.node.get_closest_marker("full_fit") is None:
        monkeypatch.setattr(projection, "TRAIN_STEPS", 10)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def small_store(tmp_path):
    """A 64-d store with small chunks, so tests cross chunk and band boundaries."""
    store = mrlstore.open(tmp_path / "s.mrl", dim=64, bands=(8, 16, 64), index_dims=(8,), chunk_rows=32)
    yield store
    store.close()


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``mount_tmpfs("3m")``: a new tmpfs of that size (root only: the test skips elsewhere), unmounted after."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
        if subprocess.run(command, capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="session")
def s3_endpoint():
    """The endpoint URL of a moto S3 server on 127.0.0.1, started once for the session."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[test]'")
    from moto_server import start_moto

    proc, url = start_moto()
    yield url
    proc.terminate()
    proc.wait()


# -- the error tests' stores (tests/errors_support.py has their parameters) -------------------------------
@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "s"


@pytest.fixture
def store(store_path: Path) -> Iterator[mrlstore.Store]:
    """A writable store (errors_support's parameters) with N rows and metadata columns n (BIGINT) and tag
    (VARCHAR). Test files that define their own ``store`` fixture use theirs."""
    s = errors_support.make_store(store_path)
    n = errors_support.N
    metadata = [{"n": i, "tag": "even" if i % 2 == 0 else "odd"} for i in range(n)]
    s.add_vectors(errors_support.vecs(n), ids=errors_support.IDS, metadata=metadata)
    yield s
    s.close()


@pytest.fixture
def empty_store(store_path: Path) -> Iterator[mrlstore.Store]:
    s = errors_support.make_store(store_path)
    yield s
    s.close()


@pytest.fixture
def closed_path(store: mrlstore.Store) -> Path:
    """The path of a populated store that is closed again (so it can be reopened)."""
    store.close()
    return store.path
