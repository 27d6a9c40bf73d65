"""Test set-up: 8 fake CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest. The fake
devices share the machine's cores: they prove sharding correctness, not speed.
"""

import os
import shutil
from collections.abc import Callable
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tools' subprocesses in tests run as they are: a restart on TCMalloc (mlcd.allocator) would
# add an interpreter start to each, and tests/test_allocator.py covers it.
os.environ.setdefault("MLCD_ALLOCATOR", "system")

import jax

_CACHE = os.environ.get(
    "MLCD_TEST_COMPILATION_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

import pytest  # noqa: E402

# The tiny presets' frozen-feature evaluators, run only after the last step: they have their own
# tests, and in training tests they would only cost time.
FINAL_ONLY_EVALS = (
    "fewshot",
    "linear_probe",
    "digits",
    "image_retrieval",
    "image_retrieval_largest",
    "grounding",
    "retrieval_sentences",
    "segmentation",
)

# A small synthetic_scenes build shared by every test that trains or reads data.
SMALL_SCENES = {"train_size": 256, "validation_size": 16, "test_size": 96, "image_size": 32}


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory):
    """data_dir holding the small synthetic_scenes build (built once per test session)."""
    from input_pipeline.datasets import synthetic_scenes

    data_dir = str(tmp_path_factory.mktemp("scenes"))
    synthetic_scenes.build(data_dir, **SMALL_SCENES)
    return data_dir


@pytest.fixture(scope="session")
def scenes_builder(scenes_dir):
    from input_pipeline.datasets import synthetic_scenes

    return synthetic_scenes.build(scenes_dir, **SMALL_SCENES)


def tiny_overrides(data_dir: str, **extra) -> list[str]:
    """--config overrides turning a tiny preset into a seconds-long run on SMALL_SCENES."""
    values = {
        "data.data_dir": data_dir,
        **{f"data.build.{k}": v for k, v in SMALL_SCENES.items()},
        "pp.image_size": 32,
        "pp.context_length": 48,
        "batch_size": 16,
        "total_steps": 2,
        "log_every": 1,
        "ckpt_every": 2,
        "eval_every": 0,
        **{f"evals.{name}.every": -1 for name in FINAL_ONLY_EVALS},
        **extra,
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


def final_state(workdir: str, step: int) -> dict:
    """{'params', 'opt_state'} of the run's checkpoint at `step`, restored as saved (same
    topology as the test that wrote it)."""
    import orbax.checkpoint as ocp  # lazily: most tests never restore a checkpoint

    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    return {k: state[k] for k in ("params", "opt_state")}


def check_exact_resume(workdir: str, resumed: str, step: int, run: Callable[[str], Any]) -> dict:
    """Copies the finished run `workdir` to `resumed`, deletes its last checkpoint (`step`),
    lets run(resumed) train from the checkpoint before, and asserts that the params, the
    optimizer state and metrics.jsonl (less the timing) equal the uninterrupted run's.
    Returns the uninterrupted run's final_state."""
    import jax
    import numpy as np

    from mlcd.metrics_writer import read_metrics

    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
    run(resumed)
    want, got = final_state(workdir, step), final_state(resumed, step)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in rows]
    assert strip(read_metrics(os.path.join(resumed, "metrics.jsonl"))) == strip(
        read_metrics(os.path.join(workdir, "metrics.jsonl"))
    )
    return want


# The entries of FINAL_ONLY_EVALS that embed texts: image-only configs (MLCD, MOFI's
# classifier; configs.common.image_only_evals) do not have them.
TEXT_EVALS = ("grounding", "retrieval_sentences", "segmentation")


def image_only(overrides: list[str]) -> list[str]:
    """tiny_overrides without the entries that switch off evaluators image-only configs lack."""
    return [o for o in overrides if not any(f".evals.{n}." in o for n in TEXT_EVALS)]


def shard_map_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value inside shard_map bodies (recursively through scan, remat, ...)."""
    import jax.extend.core as jcore

    shapes = []

    def walk(jx, inside):
        for eqn in jx.eqns:
            # A shard_map equation's own outputs are global views (e.g. the per-device residuals
            # concatenated); only the per-device values inside its body count.
            if inside:
                shapes.extend(tuple(v.aval.shape) for v in eqn.outvars)
            for sub in jcore.jaxprs_in_params(eqn.params):
                walk(sub, inside or eqn.primitive.name == "shard_map")

    walk(jaxpr.jaxpr, False)
    return shapes
