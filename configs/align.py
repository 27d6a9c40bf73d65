"""ALIGN: softmax contrastive loss with label smoothing 0.1, the SUM of both directions, and a
learned temperature initialised at 1 (ALIGN's paper; it converges near 1/64).

Presets: tiny (CPU, synthetic_scenes), b16 (ViT-B/16 towers with ALIGN's loss and batch 16K).
"""

from configs import common


def _b16(c):
    c = common.paper_b16_preset(c)
    c.batch_size = 16_384
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10_000
    c.optim.weight_decay = 1e-5
    return c


PRESETS = {"tiny": common.tiny_preset, "b16": _b16}


def get_config(arg=None):
    c = common.base_config()
    c.objective = {"name": "softmax_contrastive", "reduction": "sum", "label_smoothing": 0.1}
    c.model.logit_scale_init = 0.0  # temperature 1
    return common.select_preset("configs/align.py", arg, PRESETS)(c)
