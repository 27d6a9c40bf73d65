"""MOFI (Wu et al., ICLR 2024): entity supervision from noisy alt-text. Entities found in the
alt-text and kept by a CLIP teacher (python -m mlcd.annotate, the I2E step) label each image;
the model learns from them by classification over the entities (sup), by CLIP-style
contrastive learning with the entity's name as the text (con), or both (multitask, the
released models). Everything MOFI-specific is under config.objective (mlcd/objectives/mofi.py).

    python -m mlcd.train --config configs/clip.py:tiny --workdir runs/clip_tiny   # the teacher
    python -m mlcd.annotate --config configs/annotate.py:tiny                     # runs/annotations_tiny
    python -m mlcd.train --config configs/mofi.py:tiny --workdir runs/mofi_tiny

Presets: tiny (multi-task), tiny_sup, tiny_con (CPU, synthetic_scenes, CLIP tiny's towers and
step budget) and b16 (ViT-B/16, 2,097,152 entities, global batch 32,768, FSDP: the paper's
scale). The paper's classifier normalisation, temperature, margin and loss weights are not
published: the defaults below (cosine classifier, s = 32, m = 0, unit weights) are knobs.
"""

import ml_collections

from configs import common


def _tiny(w_sup: float, w_con: float, w_clip: float = 0.0):
    def preset(c):
        c = common.tiny_preset(c)
        # The alt-text: the field the entities were found in, and CLIP's text for w_clip.
        c.data.text_keys = ("alt_text",)
        c.objective.num_entities = 48  # synthetic_scenes: 8 colours x 6 shapes
        c.objective.annotations = "runs/annotations_tiny"  # configs/annotate.py:tiny writes it
        c.objective.w_sup, c.objective.w_con, c.objective.w_clip = w_sup, w_con, w_clip
        ops = ["random_resized_crop"]
        if w_clip:
            ops += ["choose_text", "tokenize"]
        ops.append("join_entities")
        if w_con:
            ops += ["choose_entity_text", "tokenize(inkey='entity_text', outkey='entity_tokens')"]
        c.pp.ops = tuple(ops)
        if not (w_con or w_clip):
            # Classifier only: an image-only model, as MLCD.
            c.model.text = None
            c.model.logit_scale_init = None
            c.evals = common.image_only_evals(c.evals)
        return c

    return preset


def _b16(c):
    """ViT-B/16 at the paper's scale: 2M entities (2^21, so they split over 64 devices),
    global batch 32,768, FSDP towers, the classifier split along C over every device with
    r = 0.1 of each shard's entities sampled as negatives (Partial FC), bfloat16 compute.
    Set objective.annotations (and the dataset) to train."""
    c = common.paper_b16_preset(c)
    c.objective.num_entities = 2_097_152
    c.objective.sample_ratio = 0.1
    c.objective.w_sup, c.objective.w_con, c.objective.w_clip = 1.0, 1.0, 0.0
    c.pp.ops = (
        "random_resized_crop",
        "join_entities",
        "choose_entity_text",
        "tokenize(inkey='entity_text', outkey='entity_tokens')",
    )
    c.evals = ml_collections.ConfigDict(
        {
            "fewshot": {"type": "fewshot"},
            "linear_probe": {"type": "linear_probe", "every": 0},
            "image_retrieval": {"type": "image_retrieval", "every": 0},
        }
    )
    return c


PRESETS = {
    "tiny": _tiny(w_sup=1.0, w_con=1.0),
    "tiny_sup": _tiny(w_sup=1.0, w_con=0.0),
    "tiny_con": _tiny(w_sup=0.0, w_con=1.0),
    "b16": _b16,
}


def get_config(arg=None):
    c = common.base_config()
    c.objective = ml_collections.ConfigDict(
        {
            "name": "mofi",
            "num_entities": 2_097_152,  # C
            # Output directory of python -m mlcd.annotate (annotations.json, labels.npy,
            # entities.json, ...), joined to examples by index (checked against their id) by
            # the join_entities op; top_l: use each example's first top_l entities (None: all).
            "annotations": ml_collections.config_dict.placeholder(str),
            "top_l": ml_collections.config_dict.placeholder(int),
            # loss = w_sup * classifier + w_con * entity-name contrastive + w_clip * CLIP on
            # the alt-text (config.data.text_keys); 0 turns a term (and its inputs) off.
            "w_sup": 1.0,
            "w_con": 1.0,
            "w_clip": 0.0,
            # Classifier: logits = s * (cos - m * [entity of the image]), r of each shard's
            # entities sampled as negatives (every positive always kept).
            "scale": 32.0,
            "margin": 0.0,
            "sample_ratio": 1.0,
            "classifier_lr_mult": 1.0,
            # Text of an entity in the contrastive term: 'name' or 'name_description'.
            "entity_text": "name",
        }
    )
    c.data.text_keys = ("alt_text",)
    return common.select_preset("configs/mofi.py", arg, PRESETS)(c)
