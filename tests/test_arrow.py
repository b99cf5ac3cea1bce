"""Arrow in and out: vector columns, add_arrow streaming, scan / to_arrow / Parquet, query_table."""

from __future__ import annotations

import tracemalloc

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mrlstore
from mrlstore.write.writer import Writer

DIM = 32


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _fixed(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


@pytest.fixture
def store(tmp_path):
    s = mrlstore.open(tmp_path / "s", dim=DIM, bands=(8, DIM), index_dims=(8,))
    yield s
    s.close()


@pytest.mark.parametrize(
    "column",
    [
        pytest.param(_fixed, id="fixed-size-list"),
        pytest.param(lambda x: pa.array(list(x), pa.list_(pa.float32())), id="list"),
        pytest.param(lambda x: pa.array(list(x), pa.large_list(pa.float64())), id="large-list-float64"),
        pytest.param(lambda x: pa.chunked_array([_fixed(x[:7]), _fixed(x[7:])]), id="chunked"),
        pytest.param(lambda x: pd.Series(list(x)), id="pandas-series"),
    ],
)
def test_vector_columns_add_and_query_like_numpy(store, column):
    x = _x(20)
    ids = store.add_vectors(column(x), ids=[f"r{i}" for i in range(20)])
    assert len(ids) == 20
    got = store.query(column(x[:3]), k=1, dims=[8, DIM])
    assert [h.ids for h in got] == [["r0"], ["r1"], ["r2"]]
    np.testing.assert_array_equal(np.array(store.get(["r5"], dims=DIM).column("vector").to_pylist()[0]),
                                  x[5].astype(np.float16).astype(np.float32))  # fmt: skip


def test_bad_vector_columns_are_clear_errors(store):
    with pytest.raises(mrlstore.ShapeError, match="one length"):
        store.add_vectors(pa.array([[1.0] * DIM, [1.0] * (DIM - 1)], pa.list_(pa.float32())))
    with pytest.raises(mrlstore.ShapeError, match="null"):
        store.add_vectors(pa.array([[1.0] * DIM, None], pa.list_(pa.float32())))
    with pytest.raises(mrlstore.ShapeError, match="numeric"):
        store.add_vectors(pa.array([["a"] * DIM], pa.list_(pa.string())))
    assert len(store) == 0


def test_add_arrow_from_every_source_keeps_ids_and_metadata(store):
    x = _x(60)
    table = pa.table({"embedding": _fixed(x), "id": [f"r{i}" for i in range(60)], "n": list(range(60))})
    assert store.add_arrow(table.slice(0, 10)) == 10
    assert store.add_arrow(table.slice(10, 10).to_reader()) == 10
    assert store.add_arrow(table.slice(20, 10).to_batches(max_chunksize=3)) == 10
    assert store.add_arrow(table.slice(30, 10).to_pandas()) == 10
    con = duckdb.connect()
    con.register("t", table.slice(40, 20))
    assert store.add_arrow(con.sql("SELECT * FROM t"), batch_size=7) == 20
    assert len(store) == 60
    assert store.get(["r42"]).column("n").to_pylist() == [42]
    assert store.query(x[55], k=1, dims=[DIM]).ids == ["r55"]
    with pytest.raises(mrlstore.InvalidInputError, match="no vector column 'emb'"):
        store.add_arrow(table, vector="emb")


def test_add_arrow_streams_in_bounded_memory(store):
    rows, batches = 2048, 40  # 40 x 256 KiB of float32 vectors: ten times the bound below

    def reader():
        schema = pa.schema([("embedding", pa.list_(pa.float32(), DIM)), ("id", pa.string())])

        def gen():
            for b in range(batches):
                x = _x(rows, seed=b)
                yield pa.record_batch([_fixed(x), pa.array([f"{b}-{i}" for i in range(rows)])], schema=schema)

        return pa.RecordBatchReader.from_batches(schema, gen())

    tracemalloc.start()
    try:
        assert store.add_arrow(reader(), batch_size=1024) == rows * batches
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(store) == rows * batches
    assert peak < 4 * rows * DIM * 4 + (8 << 20), peak  # a few batches, whatever the input's size


def test_a_failure_part_way_keeps_the_committed_batches_and_nothing_of_the_failing_one(store):
    x = _x(30)
    x[25, 3] = np.nan
    table = pa.table({"embedding": _fixed(x), "id": [f"r{i}" for i in range(30)]})
    with pytest.raises(mrlstore.NonFiniteError):
        store.add_arrow(table, batch_size=10)
    assert len(store) == 20 and sorted(store.sql("SELECT id FROM items").column("id").to_pylist()) == sorted(
        f"r{i}" for i in range(20)
    )


def test_scan_to_arrow_and_parquet_round_trip(store, tmp_path):
    x = _x(50)
    store.add_vectors(x, ids=[f"r{i}" for i in range(50)], metadata=[{"n": i, "tag": "ab"[i % 2]} for i in range(50)])
    store.delete(["r7"])
    reader = store.scan(dims=8, batch_size=16)
    assert isinstance(reader, pa.RecordBatchReader)
    batches = list(reader)
    assert max(b.num_rows for b in batches) <= 16 and sum(b.num_rows for b in batches) == 49
    t = store.to_arrow(columns=["n"], where="tag = 'a'")
    assert t.column_names == ["id", "n"] and t.column("n").to_pylist() == [i for i in range(0, 50, 2)]
    assert store.export_parquet(tmp_path / "out.parquet", dims=DIM) == 49
    with mrlstore.open(tmp_path / "copy", dim=DIM, bands=(8, DIM), index_dims=(8,)) as copy:
        assert (
            copy.add_arrow(pq.ParquetFile(tmp_path / "out.parquet").iter_batches(batch_size=10), vector="vector") == 49
        )
        assert copy.to_arrow(dims=DIM).sort_by("id").equals(store.to_arrow(dims=DIM).sort_by("id"))


def test_query_table_is_one_table_for_a_batch(store):
    x = _x(40)
    store.add_vectors(x, ids=[f"r{i}" for i in range(40)], metadata=[{"n": i} for i in range(40)])
    t = store.query_table(x[:3], k=4, dims=[8, DIM])
    assert t.column_names == ["query", "rank", "id", "score", "n"]
    assert t.column("query").to_pylist() == [0] * 4 + [1] * 4 + [2] * 4
    assert t.column("rank").to_pylist() == [1, 2, 3, 4] * 3
    assert t.filter(pa.compute.equal(t.column("rank"), 1)).column("id").to_pylist() == ["r0", "r1", "r2"]


def test_arrow_tensor_columns_are_vectors_read_without_a_copy(store):
    from mrlstore.inputs.arrow import to_matrix

    x = _x(12)
    tensors = pa.FixedShapeTensorArray.from_numpy_ndarray(x)  # Arrow's canonical fixed_shape_tensor
    matrix = to_matrix(tensors)
    assert np.shares_memory(matrix, tensors.storage.flatten().to_numpy()) and np.array_equal(matrix, x)
    ids = store.add_vectors(tensors)
    assert store.add_arrow(pa.table({"id": [f"t{i}" for i in range(12)], "embedding": tensors})) == 12
    assert len(store) == 24 and store.query(tensors[3:4], k=1, dims=[DIM])[0].ids[0] in (ids[3], "t3")
    table = pa.table({"embedding": pa.chunked_array([tensors.slice(0, 5), tensors.slice(5)])})
    np.testing.assert_array_equal(to_matrix(table.column("embedding")), x)
    with pytest.raises(mrlstore.ShapeError, match="shape"):
        store.add_vectors(pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((3, 2, DIM // 2), np.float32)))


def test_query_table_reads_the_vector_column_of_a_table(store):
    x = _x(30)
    store.add_vectors(x, ids=[f"r{i}" for i in range(30)])
    queries = pa.table({"id": ["a", "b"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[:2].ravel()), DIM),
                        "label": ["x", "y"]})  # fmt: skip
    t = store.query_table(queries, k=2, dims=[DIM])
    assert t.filter(pa.compute.equal(t.column("rank"), 1)).column("id").to_pylist() == ["r0", "r1"]
    renamed = queries.rename_columns(["id", "vec", "label"])
    assert store.query_table(renamed.to_pandas(), k=1, dims=[DIM], vector="vec").column("id").to_pylist() == [
        "r0", "r1"]  # fmt: skip
    with pytest.raises(mrlstore.InvalidInputError, match="no vector column 'embedding'"):
        store.query_table(renamed, k=1)
    with pytest.raises(mrlstore.InvalidInputError, match="query_table"):
        store.query(queries, k=1)  # a table is neither vectors nor images


def test_add_arrow_encodes_an_image_column(tmp_path):
    import io

    from PIL import Image

    class PixelEncoder:
        dim, nesting = 48, (8, 48)

        def encode(self, images, batch_size=64):
            return np.stack([np.asarray(Image.fromarray(im).resize((4, 4)), np.float32).ravel() + 1 for im in images])

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    table = pa.table({"img": [png(i) for i in range(5)], "label": list("abcde")})
    with mrlstore.open(tmp_path / "s", encoder=PixelEncoder(), bands=(8, 48), index_dims=(8,)) as s:
        assert s.add_arrow(table, vector=None, id=None, image="img") == 5
        assert sorted(s.sql("SELECT label FROM items").column("label").to_pylist()) == list("abcde")
        with pytest.raises(mrlstore.InvalidInputError, match="exactly one"):
            s.add_arrow(table, image="img")
        committed = []

        def stream():  # 100 batches of one image: how many are read before the first commit?
            for i in range(100):
                committed.append(len(s))
                yield pa.record_batch({"img": [png(100 + i)]})

        assert s.add_arrow(stream(), vector=None, id=None, image="img") == 100
        assert committed.count(5) <= 64  # a batch of images was sized by vectors: 32,768 rows, the whole stream


def test_batches_of_other_schemas_are_unified_and_merged(store, monkeypatch):
    """Merging small batches raised ArrowInvalid ('Schema at index 1 was different') where one batch's column
    was all null, another had one more column, or only the nullable flag differed."""
    x = _x(4)
    batches = [
        pa.record_batch({"v": _fixed(x[:1]), "id": ["a"], "tag": pa.nulls(1)}),
        pa.record_batch({"v": _fixed(x[1:2]), "id": ["b"], "tag": ["t"]}),
        pa.record_batch({"v": _fixed(x[2:3]), "id": ["c"], "tag": ["u"], "n": [1]}),
        pa.RecordBatch.from_arrays(
            [_fixed(x[3:4]), pa.array(["d"]), pa.array(["w"])],
            schema=pa.schema([("v", _fixed(x[3:4]).type), ("id", pa.string(), False), ("tag", pa.string())]),
        ),
    ]
    writes = []
    write = Writer.write
    monkeypatch.setattr(Writer, "write", lambda self, *a, **k: writes.append(len(a[0])) or write(self, *a, **k))
    assert store.add_arrow(batches, vector="v", id="id") == 4
    got = store.sql("SELECT id, tag, n FROM items ORDER BY id").to_pylist()
    assert got == [{"id": "a", "tag": None, "n": None}, {"id": "b", "tag": "t", "n": None},
                   {"id": "c", "tag": "u", "n": 1}, {"id": "d", "tag": "w", "n": None}]  # fmt: skip
    assert writes == [4]  # unified and merged: one commit (each batch its own was 80x slower)
    clash = [pa.record_batch({"v": _fixed(x[:1]), "id": ["e"], "tag": [1]}),
             pa.record_batch({"v": _fixed(x[1:2]), "id": ["f"], "tag": ["x"]})]  # fmt: skip
    assert store.add_arrow(clash, vector="v", id="id") == 2  # types that do not unify: apart, each its own


def test_a_column_that_only_recent_commits_have_reads_as_nulls_everywhere(store):
    x = _x(4600)
    store.add_vectors(x[:4500], ids=[f"r{i}" for i in range(4500)], metadata=[{"n": i} for i in range(4500)])
    store.add_vectors(x[4500:], ids=[f"r{i}" for i in range(4500, 4600)], metadata=[{"tag": "t"}] * 100)
    t = store.scan(columns=["tag"], batch_size=1000).read_all()  # batches wholly inside older rows too
    assert t.num_rows == 4600 and t.column("tag").null_count == 4500
    assert store.query(x[3], k=1, dims=[DIM]).metadata == [{"n": 3, "tag": None}]
    assert store.query(x[4503], k=1, dims=[DIM]).metadata == [{"n": None, "tag": "t"}]
