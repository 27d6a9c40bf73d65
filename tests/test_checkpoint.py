"""Checkpointer: save -> restore is bit-exact (arrays, dtypes, data-iterator state) onto the
target's shardings, on any mesh (8 devices -> (4, 2) -> 1 device); keep=N keeps the last N
steps; restore_subtree reads only the requested leaves and names a missing one; a read_only
Checkpointer creates and writes nothing; abstract_like. No jit compilation: arrays are made
with device_put and compared on the host."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from mlcd import sharding
from mlcd.checkpoint import Checkpointer, abstract_like

STEPS = (1, 2, 3)
BIG = (256, 1024)  # 1 MiB of random float32 (incompressible): the optimizer moment


def _host_state(step: int) -> dict:
    """A train-state-shaped tree whose values depend on `step` (float32, bfloat16, int32,
    uint32 leaves; scalars; a 1 MiB optimizer moment)."""
    rng = np.random.default_rng(step)
    return {
        "params": {
            "w": rng.normal(size=(16, 8)).astype(np.float32),
            "b": rng.normal(size=(8,)).astype(np.float32),
            "emb": jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16),
        },
        "opt_state": {"mu": rng.normal(size=BIG).astype(np.float32), "count": np.int32(step)},
        "step": np.int32(step),
        "rng": rng.integers(0, 2**32, (2,), dtype=np.uint32),
    }


def _data_state(step: int) -> dict:
    return {"epoch": step // 2, "position": 16 * step, "shards": ["a", "b"], "seed": None}


def _shardings(mesh, w_spec, mu_spec) -> dict:
    rep = NamedSharding(mesh, P())
    return {
        "params": {"w": NamedSharding(mesh, w_spec), "b": rep, "emb": rep},
        "opt_state": {"mu": NamedSharding(mesh, mu_spec), "count": rep},
        "step": rep,
        "rng": rep,
    }


def _place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def _assert_identical(got, want, shardings=None):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    if shardings is not None:
        for g, s in zip(jax.tree.leaves(got), jax.tree.leaves(shardings), strict=True):
            assert g.sharding == s, (g.sharding, s)


def _file_bytes_read() -> int:
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v["value"] for m in metrics for v in m["values"])


def _tree_snapshot(root) -> dict:
    """{relative path: (size, mtime_ns)} of everything under root, directories included."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            out[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def mesh8():
    assert jax.device_count() == 8  # conftest's fake CPU devices
    return sharding.make_mesh((("data", -1),))


@pytest.fixture(scope="module")
def run(mesh8, tmp_path_factory):
    """Steps 1, 2, 3 saved with keep=2 from the 8-device mesh (w and mu sharded on dim 0)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    shardings = _shardings(mesh8, P("data", None), P("data", None))
    ckpt = Checkpointer(workdir, keep=2)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    for step in STEPS:
        ckpt.save(step, _place(_host_state(step), shardings), _data_state(step))
    ckpt.close()
    return workdir, shardings


def test_keep_keeps_the_last_steps(run):
    workdir, _ = run
    ckpt = Checkpointer(workdir, keep=2)
    assert ckpt.latest_step() == 3
    assert ckpt.all_steps() == [2, 3]
    on_disk = sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert on_disk == ["2", "3"]
    ckpt.close()


def test_keep_none_keeps_everything_and_latest_step_follows_saves(mesh8, tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    assert os.path.isdir(tmp_path / "checkpoints")  # a writing Checkpointer creates it
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    state = _place({"x": np.arange(8, dtype=np.float32)}, {"x": NamedSharding(mesh8, P("data"))})
    for step in (5, 10, 20, 30):
        ckpt.save(step, state, {"n": step})
        ckpt.wait()
        assert ckpt.latest_step() == step
    assert ckpt.all_steps() == [5, 10, 20, 30]
    ckpt.close()


def test_save_restore_is_bit_identical(run):
    workdir, shardings = run
    ckpt = Checkpointer(workdir, keep=2)
    for step in (2, 3):
        want = _place(_host_state(step), shardings)
        state, data = ckpt.restore(step, abstract_like(want, shardings))
        _assert_identical(state, want, shardings)
        assert data == _data_state(step)
    ckpt.close()


def test_restore_of_another_train_state_names_the_arrays(run):
    """A checkpoint of another model (a parameter renamed, one of another shape) is refused
    before anything is read, naming the parameters, not with orbax's whole-tree dump."""
    workdir, shardings = run
    ckpt = Checkpointer(workdir, keep=2)
    target = abstract_like(_place(_host_state(3), shardings), shardings)
    target["params"]["w2"] = target["params"].pop("w")
    target["params"]["b"] = jax.ShapeDtypeStruct((9,), jnp.float32, sharding=shardings["step"])
    message = (
        r"checkpoint 3 in .*checkpoints was written for another train state \(3 arrays differ; "
        r"params/b: \(8,\) on disk, \(9,\) in this run; params/w: \(16, 8\) on disk, absent "
        r"in this run; params/w2: absent on disk, \(16, 8\) in this run\)"
    )
    with pytest.raises(ValueError, match=message):
        ckpt.restore(3, target)
    ckpt.close()


def test_restore_onto_other_meshes(run, tmp_path):
    """8 devices -> (4, 2) mesh with 2-D shardings -> saved from there -> one device."""
    workdir, _ = run
    want = _host_state(3)

    mesh42 = sharding.make_mesh((("data", 4), ("model", 2)))
    s42 = _shardings(mesh42, P("data", "model"), P("model", "data"))
    ckpt = Checkpointer(workdir, keep=2)
    state42, data = ckpt.restore(3, abstract_like(want, s42))
    ckpt.close()
    _assert_identical(state42, want, s42)
    assert data == _data_state(3)
    assert len(state42["params"]["w"].addressable_shards) == 8
    assert state42["params"]["w"].addressable_shards[0].data.shape == (4, 4)

    resumed = Checkpointer(str(tmp_path), keep=2)
    resumed.save(4, state42, data)
    resumed.close()

    device = jax.devices()[0]
    mesh1 = sharding.make_mesh((("data", -1),), devices=[device])
    s1 = _shardings(mesh1, P("data", None), P())
    s1["opt_state"]["mu"] = SingleDeviceSharding(device)
    state1, data1 = Checkpointer(str(tmp_path), read_only=True).restore(4, abstract_like(want, s1))
    _assert_identical(state1, want, s1)
    assert data1 == _data_state(3)


def test_restore_subtree_reads_only_the_requested_leaves(run):
    workdir, _ = run
    want = _host_state(3)
    mesh42 = sharding.make_mesh((("data", 4), ("model", 2)))
    target = {
        "params": {
            "w": jax.ShapeDtypeStruct(
                (16, 8), jnp.float32, sharding=NamedSharding(mesh42, P("data"))
            ),
            "emb": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=NamedSharding(mesh42, P())),
        }
    }
    ckpt = Checkpointer(workdir, read_only=True)
    before = _file_bytes_read()
    got = ckpt.restore_subtree(3, target)
    read = _file_bytes_read() - before
    _assert_identical(
        got,
        {"params": {"w": want["params"]["w"], "emb": want["params"]["emb"]}},
        jax.tree.map(lambda t: t.sharding, target),
    )
    # Metadata plus 640 bytes of arrays; the 1 MiB moment (random, incompressible) was not read.
    assert 0 < read < want["opt_state"]["mu"].nbytes / 4, read

    missing = {"params": {**target["params"], "extra": target["params"]["emb"]}}
    with pytest.raises(ValueError, match=r"checkpoint 3 in .*checkpoints has no 'params/extra'"):
        ckpt.restore_subtree(3, missing)
    nested = {"opt_state": {"nu": {"x": target["params"]["emb"]}}}
    with pytest.raises(ValueError, match=r"has no 'opt_state/nu/x'"):
        ckpt.restore_subtree(3, nested)


@pytest.mark.xfail(
    strict=True,
    reason="Checkpointer.restore() then restore_subtree() (or the reverse) on one instance: "
    "orbax's CompositeCheckpointHandler binds item 'state' to the first handler used "
    "(StandardCheckpointHandler vs PyTreeCheckpointHandler), so the second call raises "
    "ValueError 'does not match with any registered handler'; the docstring only warns about "
    "Checkpointers that have saved",
)
def test_restore_and_restore_subtree_on_one_checkpointer(run):
    workdir, shardings = run
    want = _host_state(3)
    ckpt = Checkpointer(workdir, read_only=True)
    state, _ = ckpt.restore(3, abstract_like(want, shardings))
    _assert_identical(state, want)
    subtree = {"params": {"b": abstract_like(want, shardings)["params"]["b"]}}
    got = ckpt.restore_subtree(3, subtree)
    np.testing.assert_array_equal(np.asarray(got["params"]["b"]), want["params"]["b"])


def test_read_only_without_checkpoints_raises_and_creates_nothing(tmp_path):
    missing = tmp_path / "no_run"
    with pytest.raises(FileNotFoundError, match=f"no checkpoints in {missing}"):
        Checkpointer(str(missing), read_only=True)
    assert not missing.exists()

    workdir = tmp_path / "fresh_run"  # a run directory that never saved
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=str(workdir / "checkpoints")):
        Checkpointer(str(workdir), read_only=True)
    assert os.listdir(workdir) == ["metrics.jsonl"]

    # A run killed before its first checkpoint completed has an empty checkpoints directory:
    # that opens, with no steps (callers report it), and stays empty.
    (workdir / "checkpoints").mkdir()
    ckpt = Checkpointer(str(workdir), read_only=True)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    ckpt.close()
    assert sorted(os.listdir(workdir)) == ["checkpoints", "metrics.jsonl"]
    assert os.listdir(workdir / "checkpoints") == []


def test_read_only_writes_nothing(run):
    """Export and evaluation open a run's checkpoints read_only: listing, restoring, a stray
    save or close leave every file and directory as it was."""
    workdir, shardings = run
    root = os.path.join(workdir, "checkpoints")
    before = _tree_snapshot(root)
    ckpt = Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]
    want = _place(_host_state(2), shardings)
    state, data = ckpt.restore(2, abstract_like(want, shardings))
    _assert_identical(state, want)
    assert data == _data_state(2)
    ckpt.save(4, want, _data_state(4))  # orbax skips saves in read_only mode
    ckpt.close()
    assert ckpt.all_steps() == [2, 3]
    assert _tree_snapshot(root) == before


def test_abstract_like(mesh8):
    tree = {"a": np.zeros((8, 3), np.float32), "b": {"c": jnp.ones((), jnp.bfloat16)}}
    shardings = {"a": NamedSharding(mesh8, P("data")), "b": {"c": NamedSharding(mesh8, P())}}
    out = abstract_like(tree, shardings)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    assert out["a"] == jax.ShapeDtypeStruct((8, 3), np.float32, sharding=shardings["a"])
    assert out["b"]["c"] == jax.ShapeDtypeStruct((), jnp.bfloat16, sharding=shardings["b"]["c"])
    assert out["a"].sharding == shardings["a"] and out["b"]["c"].sharding == shardings["b"]["c"]
    with pytest.raises(ValueError):
        abstract_like(tree, {"a": shardings["a"]})  # shardings must match the tree
