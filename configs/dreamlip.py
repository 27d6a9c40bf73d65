"""DreamLIP (Zheng et al., ECCV 2024): long captions split into sentences, K of them drawn per
image and epoch as positives (multi-positive contrastive), and a grouping loss that pools the
patches each sub-caption matches into a region and contrasts it with the image's other regions.
Everything DreamLIP-specific is under config.objective (mlcd/objectives/dreamlip.py).

    python -m mlcd.train --config configs/dreamlip.py:tiny --workdir runs/dreamlip_tiny

Presets: the paper's ablation rows (its CC3M table: CLIP, + long caption, + sub-captions,
+ short captions, + grouping), on the CPU tiny budget of configs/clip.py:tiny:
  tiny_long   CLIP on the whole long caption (w_clip only, text = long_caption)
  tiny_sub    + sub-captions: K sentences of the long caption as positives (w_mp)
  tiny_short  + the short caption in the sub-caption pool
  tiny        + the grouping loss (w_sub): the full method
and b16: ViT-B/16 at CLIP's paper scale with K = 8 (the paper's saturation point).

The paper does not publish its loss weights, grouping threshold or local temperature: the
defaults below (unit weights, sigma = 0, local scale initialised at 1/0.07 and learned) are
knobs. Its released code differs in places; those forms are knobs too (scope='batch').
"""

import math

import ml_collections

from configs import common


def _tiny(*, sub: bool, short: bool, group: bool):
    def preset(c):
        c = common.tiny_preset(c)
        o = c.objective
        # 1-4 objects: a long caption has 2-5 sentences, so the pool holds 2-6 sub-captions.
        o.num_sub_captions = 4
        # A sentence is <= 12 tokens and a short caption <= 22 with this tokenizer: 24 keeps
        # them whole at half the long caption's 48 (attention costs O(L^2) per text).
        o.sub_caption_length = 24
        o.include_short = short
        o.w_mp = 1.0 if sub else 0.0
        o.w_sub = 1.0 if group else 0.0
        o.w_clip = 0.0 if sub else 1.0
        ops = ["random_resized_crop"]
        if o.w_clip:
            # The ablation's first row: CLIP on the whole long caption.
            c.data.text_keys = ("long_caption",)
            ops += ["choose_text", "tokenize"]
        if sub:
            ops.append("sample_sub_captions")
        c.pp.ops = tuple(ops)
        return c

    return preset


def _b16(c):
    """ViT-B/16 at CLIP's paper scale (global batch 32,768, FSDP, bfloat16) with K = 8
    sub-captions of <= 32 tokens per image, short caption in the pool, grouping on."""
    c = common.paper_b16_preset(c)
    c.objective.num_sub_captions = 8
    c.objective.sub_caption_length = 32
    c.pp.ops = ("random_resized_crop", "sample_sub_captions")
    return c


PRESETS = {
    "tiny": _tiny(sub=True, short=True, group=True),
    "tiny_long": _tiny(sub=False, short=False, group=False),
    "tiny_sub": _tiny(sub=True, short=False, group=False),
    "tiny_short": _tiny(sub=True, short=True, group=False),
    "b16": _b16,
}


def get_config(arg=None):
    c = common.base_config()
    c.objective = ml_collections.ConfigDict(
        {
            "name": "dreamlip",
            # loss = w_clip * CLIP on config.data.text_keys + w_mp * multi-positive
            # contrastive over the sub-captions + w_sub * grouping; 0 turns a term off.
            "w_clip": 0.0,
            "w_mp": 1.0,
            "w_sub": 1.0,
            # Sub-captions (op sample_sub_captions): K per image and epoch from the pool
            # {short caption(s) if include_short} + {sentences of the long caption(s), merged
            # sentences_per_sub_caption at a time}; a long caption without a sentence falls
            # back to the short caption(s). Tokenized to sub_caption_length (None: the
            # context length).
            "num_sub_captions": 8,
            "long_caption_keys": ("long_caption",),
            "short_caption_keys": ("short_caption",),
            "include_short": True,
            "sentences_per_sub_caption": 1,
            "sub_caption_length": ml_collections.config_dict.placeholder(int),
            # Grouping: patch weights below threshold (after min-max scaling to [0, 1]) are
            # zeroed; scope 'image' contrasts a region with its image's other regions (paper),
            # 'batch' with every region of the batch (released code).
            "threshold": 0.0,
            "scope": "image",
            "local_scale_init": math.log(1 / 0.07),
            "max_local_scale": 100.0,
        }
    )
    c.data.text_keys = ("short_caption",)
    return common.select_preset("configs/dreamlip.py", arg, PRESETS)(c)
