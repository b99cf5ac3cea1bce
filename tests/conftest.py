from __future__ import annotations

import numpy as np
import pytest

import mrlstore


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def small_store(tmp_path):
    """A 64-d store with small chunks, so tests cross chunk and band boundaries."""
    store = mrlstore.open(tmp_path / "s.mrl", dim=64, bands=(8, 16, 64), index_dims=(8,), chunk_rows=32)
    yield store
    store.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """The endpoint URL of a moto S3 server on 127.0.0.1, started once for the session."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[test]'")
    from moto_server import start_moto

    proc, url = start_moto()
    yield url
    proc.terminate()
    proc.wait()
