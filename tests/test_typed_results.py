"""Typed results: one rule for single and batch queries (Hits, HitsBatch), records for info/tune/compact
that also read like the dicts they replaced, and types a user's type checker sees (py.typed, overloads)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import mrlstore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    s = mrlstore.open(tmp_path / "s", dim=32, bands=(8, 32), index_dims=(8,))
    x = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    s.add_vectors(x, ids=[f"r{i}" for i in range(300)], metadata=[{"n": i} for i in range(300)])
    yield s, x
    s.close()


def test_one_query_gives_hits_and_a_batch_gives_a_hits_batch(store):
    s, x = store
    one = s.query(x[3], k=4)
    assert isinstance(one, mrlstore.Hits) and one.ids[0] == "r3"
    batch = s.query(x[:3], k=4)
    assert isinstance(batch, mrlstore.HitsBatch) and isinstance(batch, list) and len(batch) == 3
    assert [h.ids[0] for h in batch] == ["r0", "r1", "r2"]
    table = batch.to_arrow()
    assert table.column_names == ["query", "rank", "id", "score", "n"] and table.num_rows == 12
    assert isinstance(s.query(x[:1], k=2), mrlstore.HitsBatch)  # a batch of one is still a batch
    column = pa.FixedSizeListArray.from_arrays(pa.array(x[:2].ravel()), 32)
    assert isinstance(s.query(column, k=2), mrlstore.HitsBatch)
    assert "HitsBatch(3 queries" in repr(batch)
    assert isinstance(batch[:2], mrlstore.HitsBatch) and batch[:2].to_arrow().num_rows == 8
    assert isinstance(batch + batch, mrlstore.HitsBatch) and len(batch + batch) == 6


@pytest.mark.parametrize("metadata", [True, False])
def test_one_query_gives_the_hits_of_a_batch_of_one(store, tmp_path, metadata):
    s, x = store
    bare = mrlstore.open(tmp_path / "bare", dim=32, bands=(8, 32), index_dims=(8,))  # no metadata columns
    bare.add_vectors(x, ids=[f"r{i}" for i in range(300)])
    for st in (s, bare):
        for v in (x[7], x[7].astype(np.float64), list(x[7])):  # the float32 fast path and the general one
            one, batch = st.query(v, k=5, metadata=metadata), st.query(x[7:8], k=5, metadata=metadata)
            assert isinstance(one, mrlstore.Hits) and one == batch[0]
            assert one.metadata == ([{"n": int(i[1:])} for i in one.ids] if metadata and st is s else
                                    [{}] * 5 if metadata else [])  # fmt: skip
            assert one.to_arrow().equals(batch[0].to_arrow())
    bare.close()


def test_info_tune_and_compact_are_records_that_read_like_dicts(store):
    s, _ = store
    info = s.info()
    assert isinstance(info, mrlstore.StoreInfo) and info.live == info["live"] == 300 and dict(info)["dim"] == 32
    assert json.loads(json.dumps(dict(info), default=str))["rows"] == 300
    with pytest.raises(KeyError):
        info["nope"]
    assert json.loads(json.dumps(info))["live"] == 300 and (info | {"x": 1})["x"] == 1  # still a dict
    assert copy.deepcopy(info).live == 300 and copy.deepcopy(info) == info  # the protocol Ray's pickling uses
    tuned = s.tune(recall=0.9, sample=50)
    assert isinstance(tuned, mrlstore.TuneResult) and tuned.dims == tuned["dims"] and tuned.recall >= 0.9
    assert s.info().tuned["dims"] == tuned.dims
    s.delete(["r1", "r2"])
    counts = s.compact()
    assert isinstance(counts, mrlstore.CompactResult) and (counts.rows_before, counts["rows_after"]) == (300, 298)
    assert json.dumps(counts) == '{"rows_before": 300, "rows_after": 298}' and json.dumps(tuned)


def test_the_old_module_name_of_the_generator_still_imports():
    with pytest.warns(DeprecationWarning, match="mrlstore.testing"):
        import importlib

        import mrlstore.synthetic

        importlib.reload(mrlstore.synthetic)
    from mrlstore.testing import mrl_like

    assert mrlstore.synthetic.mrl_like is mrl_like


@pytest.mark.slow
def test_a_type_checker_sees_the_rule(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed")
    assert (ROOT / "mrlstore" / "py.typed").exists() and (ROOT / "mrlstore" / "_kernels.pyi").exists()
    user = tmp_path / "user_code.py"
    user.write_text(
        textwrap.dedent("""
        import numpy as np
        import mrlstore
        store = mrlstore.open("photos.mrl", dim=4)
        reveal_type(store.query([0.1, 0.2, 0.3, 0.4]))
        reveal_type(store.query([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
        reveal_type(store.query(np.zeros((2, 4), dtype=np.float32)))
        reveal_type(store.info().live)
        reveal_type(store.tune().dims)
        reveal_type(store.query((0.1, 0.2, 0.3, 0.4)))
        batch = store.query([[0.1, 0.2, 0.3, 0.4]])
        reveal_type(batch[0])
        reveal_type(batch[:1])
        added = store.add("photos/")
        reveal_type(added[0])
        reveal_type(added[:1])
        reveal_type(batch[0].to_pandas())
        reveal_type(store.query([(0.1, 0.2, 0.3, 0.4), (0.4, 0.3, 0.2, 0.1)]))
    """)
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
         str(user)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MYPYPATH": str(ROOT)},
    )  # fmt: skip
    revealed = [line.split('Revealed type is "')[1].rstrip('"') for line in out.stdout.splitlines()
                if "Revealed" in line]  # fmt: skip
    hits, batch = "mrlstore.results.Hits", "mrlstore.results.HitsBatch"
    assert [r.replace("builtins.", "") for r in revealed] == [
        hits, batch, f"{hits} | {batch}", "int", "list[int]", hits, hits, batch, "str", "list[str]", "Any", batch,
    ], out.stdout  # fmt: skip


@pytest.mark.slow
def test_encoders_configs_and_result_types_as_users_write_them_type_check(tmp_path):
    """What the README describes failed mypy: an encoder with a class attribute ``nesting = (16, 64)`` or
    read-only properties (the protocol asked for settable tuple[int, ...]), ``StoreConfig(bands=[...])``, a
    ``list[int]`` or ``Sequence[float]`` query (typed as the union), and the names of load_encoder()'s
    and AddResult.failed's types."""
    pytest.importorskip("mypy", reason="mypy is not installed")
    user = tmp_path / "user_code.py"
    user.write_text(
        textwrap.dedent("""
        from collections.abc import Sequence
        import numpy as np
        import mrlstore

        class ClassAttributes:
            dim = 64
            nesting = (16, 64)
            def encode(self, images: object) -> np.ndarray:
                return np.zeros((1, 64), np.float32)

        class Properties:
            @property
            def dim(self) -> int:
                return 64
            @property
            def nesting(self) -> list[int]:
                return [16, 64]
            def encode(self, images: object) -> np.ndarray:
                return np.zeros((1, 64), np.float32)

        def use(store: mrlstore.Store, one: list[int], seq: Sequence[float], many: list[list[float]]) -> None:
            a: mrlstore.Hits = store.query(one)
            b: mrlstore.Hits = store.query(seq)
            c: mrlstore.HitsBatch = store.query(many)
            d: mrlstore.Hits = store.similar("an id")
            e: mrlstore.HitsBatch = store.similar(["an id", "another"])
            print(a, b, c, d, e)

        def encoder() -> mrlstore.ImageEncoder:
            return mrlstore.load_encoder()

        def failures(result: mrlstore.AddResult) -> list[mrlstore.Failure]:
            return list(result.failed)

        mrlstore.open("a.mrl", encoder=ClassAttributes())
        mrlstore.open("b.mrl", encoder=Properties())
        config = mrlstore.StoreConfig(bands=[16, 64], index_dims=[16])
    """)
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", "--follow-imports=silent",
         "--no-incremental", str(user)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MYPYPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0 and "Success" in out.stdout, out.stdout


def test_a_config_keeps_sequences_of_numpy_ints_as_a_tuple_of_ints():
    config = mrlstore.StoreConfig(bands=np.array([16, 64]), index_dims=[np.int32(16)])
    assert config.bands == (16, 64) and config.index_dims == (16,)
    assert all(type(v) is int for v in (*config.bands, *config.index_dims))


def test_a_tune_result_prints_its_choice_not_every_point(tmp_path):
    """print(store.tune()) printed every point measured (about 10 kB); the points stay in ``tried``."""
    from mrlstore.testing import mrl_like

    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64), index_dims=(16,)) as store:
        store.add_vectors(mrl_like(600, 64)[0])
        result = store.tune(recall=0.9)
    text = repr(result)
    assert text.startswith(f"TuneResult(dims={result.dims}, shortlist={result.shortlist}, ") and len(text) < 300
    assert str(result) == text and len(result.tried) > 1 and result["tried"] == result.tried


def test_the_image_encoders_name_without_torch_is_a_missing_attribute(monkeypatch):
    """It raised ModuleNotFoundError, so hasattr() and getattr(..., None) raised too."""
    monkeypatch.setitem(sys.modules, "mrlstore.encoder.model", None)  # as if torch were not installed
    assert not hasattr(mrlstore, "ImageEncoder") and getattr(mrlstore, "ImageEncoder", None) is None
    with pytest.raises(AttributeError, match="needs torch"):
        mrlstore.ImageEncoder  # noqa: B018
