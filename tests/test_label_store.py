"""mlcd.label_store: the on-disk label store (atomic, streamed writes; the id hash) and
LabelTable, the memory-mapped join of labels to examples by their index in the split."""

import os
import re

import numpy as np
import pytest

from mlcd import label_store
from mlcd.label_store import LabelTable

L = 8


def write_store(path, ids, labels, chunk=None):
    """The four label files of `ids` / `labels` under `path` (in chunks of `chunk` rows)."""
    os.makedirs(path, exist_ok=True)
    ids, labels = np.asarray(ids, str), np.asarray(labels, np.int32)
    sims = np.linspace(1.0, 0.5, labels.shape[1], dtype=np.float32)[None].repeat(len(ids), 0)
    step = chunk or max(len(ids), 1)
    chunks = [
        (ids[i : i + step], labels[i : i + step], sims[i : i + step])
        for i in range(0, len(ids), step)
    ]
    label_store.write_label_files(path, len(ids), labels.shape[1], ids.dtype.itemsize // 4, chunks)
    return path


def table(path, num_classes, top_l=None, **kwargs):
    labels, id_hashes = label_store.open_arrays(path, "config.objective.labels")
    return LabelTable(path, labels, id_hashes, num_classes, top_l, **kwargs)


def split_ids(n):
    return np.array([f"train_{i:08d}" for i in range(n)])


def test_files_and_id_hash(tmp_path):
    ids = np.array(["a", "bé", "ccc", "d", "e"])
    labels = np.arange(5 * 3, dtype=np.int32).reshape(5, 3) - 1
    path = write_store(str(tmp_path / "s"), ids, labels, chunk=2)  # chunks of 2, 2, 1
    assert sorted(os.listdir(path)) == sorted(label_store.LABEL_FILES)
    loaded = {name: np.load(os.path.join(path, name)) for name in label_store.LABEL_FILES}
    assert loaded["ids.npy"].dtype == np.dtype("<U3") and loaded["ids.npy"].tolist() == list(ids)
    np.testing.assert_array_equal(loaded["labels.npy"], labels)
    assert loaded["labels.npy"].dtype == np.int32
    assert loaded["similarities.npy"].dtype == np.float32
    assert loaded["similarities.npy"].shape == (5, 3)
    assert loaded["id_hashes.npy"].dtype == np.uint64
    np.testing.assert_array_equal(loaded["id_hashes.npy"], label_store.id_hash(ids))
    # The hash is part of the format: files written today must match any later run's hashes.
    assert label_store.id_hash(["train_00000000"]).tolist() == [1484004951770724266]
    assert label_store.id_hash([]).shape == (0,)

    labels_mm, hashes_mm = label_store.open_arrays(path, "config.objective.labels")
    assert isinstance(labels_mm, np.memmap) and isinstance(hashes_mm, np.memmap)
    assert labels_mm.shape == (5, 3) and hashes_mm.shape == (5,)


def test_writes_are_atomic(tmp_path):
    path = str(tmp_path / "s")
    os.makedirs(path)
    ids, labels = split_ids(10), np.zeros((10, 2), np.int32)
    sims = np.zeros((10, 2), np.float32)

    def crashing():
        yield ids[:5], labels[:5], sims[:5]
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        label_store.write_label_files(path, 10, 2, 14, crashing())
    assert os.listdir(path) == []  # neither the files nor their temporaries
    with pytest.raises(ValueError, match=r"s/ids\.npy: got 5 rows, expected 10"):
        label_store.write_label_files(path, 10, 2, 14, [(ids[:5], labels[:5], sims[:5])])
    assert os.listdir(path) == []
    with pytest.raises(ValueError, match=r"id 'train_00000000' is longer than id_width=4"):
        label_store.write_label_files(path, 10, 2, 4, [(ids, labels, sims)])
    assert os.listdir(path) == []

    # What a writer killed mid-file leaves behind, and its clean-up.
    os.makedirs(os.path.join(path, "sub"))
    stale = [os.path.join(path, "labels.npy.tmp-123"), os.path.join(path, "sub", "x.npz.tmp-9")]
    for p in stale:
        open(p, "w").close()
    label_store.save_json(os.path.join(path, "meta.json"), {"complete": True})
    label_store.remove_stale_temporaries(path, ("sub",))
    assert sorted(os.listdir(path)) == ["meta.json", "sub"]
    assert os.listdir(os.path.join(path, "sub")) == []


def _id_join(ids: np.ndarray, labels: np.ndarray, query: list[str]) -> np.ndarray:
    """The join by id that the index join replaced: the labels of the rows whose ids match."""
    row = {str(i): r for r, i in enumerate(ids)}
    return labels[[row[i] for i in query]]


def test_index_join_equals_the_id_join(tmp_path):
    rng = np.random.default_rng(0)
    n = 1000
    # Ids of mixed lengths, non-ASCII included, in no sorted order.
    ids = np.array([f"{'é' * (i % 3)}img/{rng.integers(1 << 40):x}-{i}" for i in range(n)])
    labels = rng.integers(-1, 40, (n, 6)).astype(np.int32)
    path = write_store(str(tmp_path / "c"), ids, labels, chunk=300)
    for top_l in (None, 3):
        joined = table(path, 40, top_l)
        for _ in range(5):
            index = rng.choice(n, 64, replace=False)
            got = joined.lookup(index, ids[index])
            assert got.dtype == np.int32
            np.testing.assert_array_equal(
                got, _id_join(ids, labels, ids[index].tolist())[:, :top_l]
            )
        # One example per call, as the input pipeline calls it (ids as a list or an array).
        for i in rng.choice(n, 50, replace=False):
            got = joined.lookup(np.array([i]), [str(ids[i])])
            assert got.dtype == np.int32 and got.shape == (1, top_l or 6)
            np.testing.assert_array_equal(got, _id_join(ids, labels, [ids[i]])[:, :top_l])
            np.testing.assert_array_equal(joined.lookup([int(i)], ids[i : i + 1]), got)
        got = joined.lookup(np.array([], np.int64), [])
        assert got.dtype == np.int32 and got.shape == (0, top_l or 6)
    order = ids[::-1]  # a file of another order: the first example's row is another id's
    bad = table(write_store(str(tmp_path / "r"), order, labels), 40)
    message = re.escape(f"example id {str(ids[0])!r} is example 0")
    with pytest.raises(ValueError, match=message):
        bad.lookup(np.arange(8), ids[:8])
    with pytest.raises(ValueError, match=message):
        bad.lookup(np.array([0]), [str(ids[0])])


def _anonymous_rss() -> int:
    """Bytes of this process's anonymous resident memory (not counting mapped files)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def test_labels_of_2m_examples_are_memory_mapped_not_read(tmp_path):
    n = 2_000_000
    ids = np.array([f"ex_{i}" for i in range(n)])
    labels = np.broadcast_to(np.arange(L, dtype=np.int32), (n, L))
    path = write_store(str(tmp_path / "c"), ids, labels, chunk=700_000)
    index = np.array([0, 123_456, n - 1])
    query = ids[index]
    del ids, labels
    before = _anonymous_rss()
    joined = table(path, 16)
    np.testing.assert_array_equal(joined.lookup(index, query), np.tile(np.arange(L), (3, 1)))
    for i, example_id in zip(index, query, strict=True):
        np.testing.assert_array_equal(joined.lookup([i], [example_id]), [np.arange(L)])
    # labels.npy is 64 MB and ids.npy 80 MB: neither was read into memory.
    assert isinstance(joined.labels, np.memmap) and isinstance(joined.id_hashes, np.memmap)
    assert _anonymous_rss() - before < 16 << 20


def test_bad_lookups_name_the_example_and_the_file(tmp_path):
    ids = split_ids(256)
    labels = np.zeros((len(ids), L), np.int32)
    labels[5, 3] = 256
    labels[7, 0] = -2
    bad = write_store(str(tmp_path / "range"), ids, labels)
    joined = table(bad, 256)  # values are checked per lookup: opening reads no rows
    np.testing.assert_array_equal(joined.lookup(np.arange(5), ids[:5]), labels[:5])
    message = r"range/labels\.npy: labels must be class ids in \[0, 256\) or -1 \(padding\); example 'train_00000005' has \[0, 0, 0, 256, 0, 0, 0, 0\]"
    with pytest.raises(ValueError, match=message):
        joined.lookup(np.arange(8), ids[:8])
    with pytest.raises(ValueError, match=message):
        joined.lookup([5], [ids[5]])
    with pytest.raises(ValueError, match=r"labels must be class ids .* 'train_00000007' has \[-2,"):
        joined.lookup([7], [ids[7]])
    np.testing.assert_array_equal(table(bad, 256, 3).lookup([5], [ids[5]]), labels[5:6, :3])

    # Indices outside the file: past its end, or negative (never wrapped around).
    for index in (256, 300, -1):
        message = (
            rf"example id 'x' of the dataset has no labels in .*range/labels\.npy: it is "
            rf"example {index} of the split, the file has 256 rows"
        )
        with pytest.raises(ValueError, match=message):
            joined.lookup([index], ["x"])
        with pytest.raises(ValueError, match=message):
            joined.lookup([0, index], [ids[0], "x"])

    # A row written for another id.
    message = r"labels file does not match this dataset/split: example id 'train_00000002' is example 3 of the split, but row 3 of .*range/id_hashes\.npy is another example's"
    with pytest.raises(ValueError, match=message):
        joined.lookup([3], [ids[2]])
    with pytest.raises(ValueError, match=message):
        joined.lookup([0, 3], [ids[0], ids[2]])


def test_bad_label_files_are_rejected(tmp_path):
    ids = split_ids(256)
    labels = np.zeros((len(ids), L), np.int32)
    path = write_store(str(tmp_path / "range"), ids, labels)
    with pytest.raises(
        ValueError, match=r"config\.objective\.top_l=9: .* has 8 labels per example"
    ):
        table(path, 256, 9, top_l_key="config.objective.top_l")
    with pytest.raises(ValueError, match=r"^top_l=0: .*range/labels\.npy has 8 labels per example"):
        table(path, 256, 0)

    label_store.save_npy(os.path.join(path, label_store.LABELS_FILE), labels.astype(np.int64))
    message = r"config\.objective\.labels: .*range/labels\.npy: int64 \(256, 8\) is not int32"
    with pytest.raises(ValueError, match=message):
        label_store.open_arrays(path, "config.objective.labels")
    id_hashes = label_store.id_hash(ids)
    with pytest.raises(ValueError, match=r"^labels: .*range/labels\.npy: int64 \(256, 8\)"):
        LabelTable(path, labels.astype(np.int64), id_hashes, 256)
    with pytest.raises(ValueError, match=r"^k: .*range/labels\.npy: int32 \(256,\) is not int32"):
        LabelTable(path, labels[:, 0], id_hashes, 256, what="k")
    with pytest.raises(ValueError, match=r"range/id_hashes\.npy: uint64 \(255,\) is not uint64"):
        LabelTable(path, labels, id_hashes[:255], 256)

    label_store.save_npy(os.path.join(path, label_store.LABELS_FILE), labels)
    hashes_path = os.path.join(path, label_store.ID_HASHES_FILE)
    label_store.save_npy(hashes_path, id_hashes.astype(np.int64))
    with pytest.raises(
        ValueError, match=r"k: .*range/id_hashes\.npy: int64 \(256,\) is not uint64"
    ):
        label_store.open_arrays(path, "k")
    label_store.save_npy(hashes_path, id_hashes[:200])
    with pytest.raises(
        ValueError, match=r"k: .*id_hashes\.npy has 200 rows but .*labels\.npy has 256"
    ):
        label_store.open_arrays(path, "k")
    os.remove(hashes_path)
    with pytest.raises(FileNotFoundError, match=r"^k: .*range/id_hashes\.npy is missing"):
        label_store.open_arrays(path, "k")
