"""SigLIP: pairwise sigmoid loss with a learned scale (init 10) and bias (init -10); image
tower with MAP pooling and a bidirectional text tower, as in big_vision's SigLIP.

Presets: tiny (CPU, synthetic_scenes), b16 (ViT-B/16, batch 32K).
"""

import math

from configs import common


def _b16(c):
    c = common.paper_b16_preset(c)
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-4
    return c


PRESETS = {"tiny": common.tiny_preset, "b16": _b16}


def get_config(arg=None):
    c = common.base_config()
    c.objective = {"name": "sigmoid_contrastive"}
    c.model.logit_scale_init = math.log(10.0)
    c.model.logit_bias_init = -10.0
    c = common.select_preset("configs/siglip.py", arg, PRESETS)(c)
    c.model.image.pool = "map"
    c.model.text.causal = False
    return c
