"""bench/train_step.py's peer: open_clip's identical network, trained next to ours.

The peer needs the optional `[torch]` extra; without it the tests that build it are skipped
with that reason. Sizes are tiny (one block per tower, batch 4): seconds, not a benchmark.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
_spec = importlib.util.spec_from_file_location(
    "bench_train_step", os.path.join(BENCH, "train_step.py")
)
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)

PEER_REASON = "optional extra not installed: pip install -e .[torch] (open_clip + torch)"
WIDTH = 32


def tiny_config():
    """bench-tiny with one narrow block per tower: 16 px / patch 8 images, 8-token captions."""
    cfg = train_step.model_config("bench-tiny", "float32")
    cfg.image.update(image_size=16, patch_size=8, width=WIDTH, depth=1, num_heads=2)
    cfg.text.update(context_length=8, vocab_size=64, width=WIDTH, depth=1, num_heads=2)
    cfg.embed_dim = 16
    return cfg


@pytest.fixture(scope="module")
def peer_modules():
    peer = train_step.import_peer()
    if isinstance(peer, str):
        pytest.skip(PEER_REASON)
    return peer


def tiny_trainers(peer_modules):
    """(ours, open_clip's) trainers of tiny_config() on one batch of 4, from the same weights."""
    torch, open_clip = peer_modules
    cfg = tiny_config()
    ours = train_step.MlcdTrainer(cfg, batch=4)
    peer = train_step.OpenClipTrainer(
        torch, open_clip, cfg, ours.images, ours.tokens, ours.state_dict(cfg)
    )
    return ours, peer


def test_peer_is_the_same_network_and_trains_like_ours(peer_modules):
    ours, peer = tiny_trainers(peer_modules)
    # The same parameters but our patch-embedding bias (open_clip's conv1 has none).
    assert ours.num_params - peer.num_params == WIDTH
    # Same weights, same batch: the same loss, which only the same network and loss can give.
    first = ours.step(), peer.step()
    assert np.isfinite(first).all()
    np.testing.assert_allclose(first[1], first[0], rtol=1e-5)
    # One AdamW update later they still agree, to far better than the update moved the loss
    # (the bias folded into open_clip's position embeddings updates slightly differently).
    second = ours.step(), peer.step()
    moved = abs(second[0] - first[0])
    assert moved > 1e-4
    assert abs(second[1] - second[0]) < 0.01 * moved


def test_alternate_times_every_step_of_every_round():
    calls = []
    steps = {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}
    times = train_step.alternate(steps, rounds=2, per_round=3)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert {name: t.shape for name, t in times.items()} == {"a": (2, 3), "b": (2, 3)}
    assert (times["a"] >= 0).all()
    with pytest.raises(RuntimeError, match="non-finite loss"):
        train_step.alternate({"nan": lambda: float("nan")}, rounds=1, per_round=1)


def test_without_open_clip_the_peer_is_skipped_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    reason = train_step.import_peer()
    assert isinstance(reason, str) and "pip install -e .[torch]" in reason


def test_matmul_paths_names_the_library_of_every_dot():
    hlo = "\n".join(
        [
            "%fused_computation.1 (p: f32[4,4]) -> f32[4,4] {",
            "  ROOT %d = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}",
            "}",
            "ENTRY %main.9 (a: f32[4,4]) -> f32[4,4] {",
            "  %y = f32[4,4]{1,0} fusion(%a), kind=kCustom, calls=%fused_computation.1, "
            'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}',
            "  %e = f32[4,4]{1,0} dot(%y, %a), lhs_contracting_dims={0}",
            '  %o = f32[4,4]{1,0} custom-call(%e, %a), custom_call_target="__onednn$matmul"',
            "  ROOT %f = f32[4,4]{1,0} dot(%o, %a), lhs_contracting_dims={0}",
            "}",
        ]
    )
    assert train_step.matmul_paths(hlo) == {
        "YNNPACK": 1,
        "Eigen (XLA DotThunk)": 2,
        "oneDNN": 1,
    }


_spec = importlib.util.spec_from_file_location(
    "bench_step_profile", os.path.join(BENCH, "step_profile.py")
)
step_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_profile)

# Two fusions calling computations with a plain and a batched dot, a bare dot, a copy.
HLO = """
%fused_a (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {
  ROOT %dot.1 = f32[8,2]{1,0} dot(f32[8,4]{1,0} %p0, f32[4,2]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%fused_b (p0: f32[2,3,4], p1: f32[2,4,5]) -> f32[2,3,5] {
  ROOT %dot.2 = f32[2,3,5]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}
ENTRY %main (a: f32[8,4], b: f32[4,2]) -> f32[8,2] {
  %ynn_fusion.3 = f32[8,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_a
  %ynn_fusion.4 = f32[2,3,5]{2,1,0} fusion(%x, %y), kind=kCustom, calls=%fused_b
  %dot.5 = f32[4,2]{1,0} dot(%a, %c), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %transpose_copy_fusion.6 = f32[2,8]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%t
}
"""


def test_step_profile_sorts_xla_events_by_what_they_compute():
    kinds = step_profile.hlo_dot_kinds(HLO)
    projections, attention, copies, other = step_profile.CATEGORIES
    assert kinds["ynn_fusion.3"] == projections and kinds["dot.5"] == projections
    assert kinds["ynn_fusion.4"] == attention
    category = lambda name: step_profile.xla_category(name, kinds)
    assert category("transpose_copy_fusion.6") == copies and category("copy.7") == copies
    assert category("add_multiply_fusion.8") == other and category("ynn_fusion.9") == other


def test_step_profile_accounts_both_steps(peer_modules):
    ours, peer = tiny_trainers(peer_modules)
    ours.step(), peer.step()  # compile, warm up
    for ms in step_profile.profile_ours(ours, steps=1), step_profile.profile_peer(peer, steps=1):
        # Both towers' projections and attention products show up, and the events fit in
        # the step's wall time (one thread runs them, plus the profiler's own overhead).
        assert ms[step_profile.CATEGORIES[0]] > 0 and ms[step_profile.CATEGORIES[1]] > 0
        assert 0 < sum(ms[c] for c in step_profile.CATEGORIES) <= 1.5 * ms["wall"]
