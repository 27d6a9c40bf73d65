"""A new method plugs in without editing the library: this file defines a toy method (a head,
an input transform and a loss), trains it for 2 steps on the 8-device mesh with the ordinary
trainer, resumes it, and exports an encoder without the head. Nothing under mlcd/ or
input_pipeline/ knows about it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from conftest import tiny_overrides

import mlcd
from configs import common
from input_pipeline import transforms
from mlcd import export, objectives, train
from mlcd.metrics_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 8  # splits over the 8 devices: the head is laid out like MLCD's centers


@transforms.TRANSFORMS.register("toy_count_label")
class CountLabel(transforms.Transform):
    """'count_label' int32: the scene's object count probe label, minus an offset from the
    config (to show that an op reads its method's own settings)."""

    reads = ("count",)
    writes = ("count_label",)

    def __init__(self, ctx):
        self.offset = int(ctx.config.objective.offset)

    def __call__(self, example, rng):
        return {"count_label": np.int32(int(example["count"]) - self.offset)}


@objectives.OBJECTIVES.register("toy_count")
class ToyCount(objectives.Objective):
    """Softmax classification of the object count from the image embedding, against a
    class-weight head [K, E] sharded over every device, with a learnable scale head."""

    inputs = ("image", "count_label")
    per_example = True

    def heads(self):
        e = self.config.model.embed_dim
        return {
            "weights": objectives.Head(
                (NUM_CLASSES, e), objectives.normal_init(e**-0.5), "partial_fc", lr_mult=2.0
            ),
            "scale": objectives.Head((), objectives.normal_init(0.0)),
        }

    def abstract_batch(self, batch_size):
        labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        return {**super().abstract_batch(batch_size), "count_label": labels}

    def loss(self, out, heads, batch, rng):
        logits = (1.0 + heads["scale"]) * out["zimg"] @ heads["weights"].T
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["count_label"])
        return ce.mean(), {"scale": heads["scale"]}


def _config(scenes_dir, **extra):
    config = common.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    common.parse_overrides(config, tiny_overrides(scenes_dir, **extra))
    with config.unlocked():
        config.objective = {"name": "toy_count", "offset": 0}
        config.pp.ops = ("random_resized_crop", "toy_count_label")
        config.model.text = None
        config.model.logit_scale_init = None
        config.evals = {"linear_probe": {"type": "linear_probe", "every": 0, "tasks": "count"}}
    return config


def test_a_method_defined_outside_the_library_trains_resumes_and_exports(scenes_dir, tmp_path):
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(_config(scenes_dir), workdir)
    assert 0.0 <= final["linear_probe/count/top1"] <= 1.0
    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2 and all(np.isfinite(r["train/loss"]) for r in records)
    assert "train/scale" in records[-1]

    # The checkpoint holds the heads (in the train state) with their moments...
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    state = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    assert sorted(state["params"]["heads"]) == ["scale", "weights"]
    assert state["params"]["heads"]["weights"].shape == (NUM_CLASSES, 128)
    assert float(state["params"]["heads"]["scale"]) != 0.0  # trained

    # ... a finished run started again resumes and reports without retraining ...
    again = train.train_and_evaluate(_config(scenes_dir), workdir)
    assert again == final

    # ... and the export is the plain image encoder.
    out = export.export(workdir, str(tmp_path / "export"))
    saved = ocp.StandardCheckpointer().metadata(os.path.join(out, "params")).item_metadata
    assert sorted(saved) == ["image"]
    encoder = mlcd.load_encoder(out)
    emb = encoder.embed_images(np.zeros((2, 32, 32, 3), np.uint8))["embedding"]
    assert emb.shape == (2, 128)
