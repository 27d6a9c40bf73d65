"""MLCD (An et al., ECCV 2024): an image-only ViT trained to discriminate the clusters of a
teacher's embeddings. Offline k-means gives C centers; each image is labelled with its top-l
nearest centers; the loss is the margin-based multi-label loss against a learned [C, E] center
matrix sharded along C over all devices (Partial FC layout; docs/architecture.md). Everything
MLCD-specific is under config.objective (mlcd/objectives/mlcd.py).

    python -m mlcd.cluster --config configs/cluster.py:tiny        # writes runs/clusters_tiny
    python -m mlcd.train --config configs/mlcd.py:tiny --workdir runs/mlcd_tiny

Presets: tiny (CPU, synthetic_scenes, 256 centers, CLIP tiny's step budget), b32 and l14
(ViT-B/32 and ViT-L/14 at the paper's scale: 1,048,576 centers, l = 8, r = 0.1, batch 32,768,
AdamW, weight decay 0.2). Paper presets need --config.objective.labels (and the dataset) set.
"""

import ml_collections

from configs import common


def _tiny(c):
    c = common.tiny_preset(c)
    c.pp.ops = ("random_resized_crop", "join_cluster_labels")
    c.objective.num_centers = 256  # configs/cluster.py:tiny clusters CLIP tiny into 256
    c.objective.labels = "runs/clusters_tiny"
    c.objective.centers_init = "runs/clusters_tiny/centroids.npy"
    # r = 1: at 256 centers every class fits in the step; the paper's r = 0.1 is its best at
    # 1M centers (a knob: --config.objective.sample_ratio=0.1).
    c.objective.sample_ratio = 1.0
    c.evals = common.image_only_evals(c.evals)
    return c


def _paper(variant, embed_dim, lr):
    """ViT-`variant` as in the paper (An et al., ECCV 2024): LAION-400M for 32 epochs at batch
    32,768 (the paper's 32,800 rounded to a power of two so it splits over 64 devices). The
    base preset's remat 'dots_saveable' fits L/14 with 1M centers on 80 GB devices in one pass
    (66 GiB per device at 64 devices; without remat it would take 8 microbatches, each
    all-gathering the FSDP parameters again: bench/dry_run.py, docs/benchmarks.md)."""

    def preset(c):
        c = common.paper_b16_preset(c)
        c.total_steps = 32 * 400_000_000 // 32_768
        c.model.image = common.image_tower(variant)
        c.model.embed_dim = embed_dim
        c.objective.num_centers = 1_048_576
        c.objective.top_l = 8
        c.objective.sample_ratio = 0.1
        c.optim.lr = lr
        c.optim.weight_decay = 0.2
        c.sharding_rules = ((".*", "fsdp"),)  # the centers head is 'partial_fc' on its own
        c.evals = ml_collections.ConfigDict(
            {
                "fewshot": {"type": "fewshot"},
                "linear_probe": {"type": "linear_probe", "every": 0},
            }
        )
        return c

    return preset


PRESETS = {
    "tiny": _tiny,
    "b32": _paper("B/32", 512, 5e-4),
    "l14": _paper("L/14", 768, 4e-4),
}


def get_config(arg=None):
    c = common.base_config()
    c.objective = ml_collections.ConfigDict(
        {
            "name": "mlcd",
            "num_centers": 1_048_576,  # C
            # A [C, E] .npy (e.g. <labels>/centroids.npy) to start the centers from; None: random.
            "centers_init": ml_collections.config_dict.placeholder(str),
            # The centers' own learning-rate multiplier (Partial FC trains them as a group).
            "centers_lr_mult": 1.0,
            # Cluster output directory of python -m mlcd.cluster (clusters.json, labels.npy,
            # ..., centroids.npy), joined to examples by index in the split (checked against
            # their id) by the join_cluster_labels op; top_l: use each example's nearest
            # top_l <= l labels (None: all l of the file).
            "labels": ml_collections.config_dict.placeholder(str),
            "top_l": ml_collections.config_dict.placeholder(int),
            "scale": 64.0,  # s: unstated in the paper; the authors' pre-training code uses 64
            "margin": 0.3,
            "margin_type": "arcface",
            "sample_ratio": 0.1,
        }
    )
    c.pp.ops = ("random_resized_crop", "flip_lr", "join_cluster_labels")
    c = common.select_preset("configs/mlcd.py", arg, PRESETS)(c)
    # Image-only: no text tower, no temperature, no captions read or tokenized.
    c.model.text = None
    c.model.logit_scale_init = None
    return c
