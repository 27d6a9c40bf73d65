"""CLIP: softmax image-text contrastive loss, mean of both directions, learned temperature
initialised at 1/0.07 and clipped at 100.

    python -m mlcd.train --config configs/clip.py:tiny --workdir runs/clip_tiny
Presets: tiny (CPU, synthetic_scenes), b16 (ViT-B/16, batch 32K, paper scale).
"""

import math

from configs import common

PRESETS = {"tiny": common.tiny_preset, "b16": common.paper_b16_preset}


def get_config(arg=None):
    c = common.base_config()
    c.objective = {"name": "softmax_contrastive", "reduction": "mean", "label_smoothing": 0.0}
    c.model.logit_scale_init = math.log(1 / 0.07)
    return common.select_preset("configs/clip.py", arg, PRESETS)(c)
