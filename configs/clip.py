"""CLIP: softmax image-text contrastive loss, mean of both directions, learned temperature
initialised at 1/0.07 and clipped at 100.

    python -m mlcd.train --config configs/clip.py:tiny --workdir runs/clip_tiny
Presets: tiny (CPU, synthetic_scenes), b16 (ViT-B/16, batch 32K, paper scale), openai_b32 /
openai_b16 / openai_l14 (fine-tuning OpenAI's weights imported by mlcd.convert_weights),
web_tiny / web_b16 (a dataset converted by input_pipeline.convert: common.converted_data).
"""

import math

from configs import common


def openai_preset(variant: str):
    """Fine-tuning from OpenAI's ViT-`variant` weights imported by mlcd.convert_weights (pass
    --config.init_from=EXPORT, --config.tokenizer=bpe_simple_vocab_16e6.txt.gz and the data):
    the b16 recipe with those towers (common.open_clip_towers) and a fine-tuning learning rate."""

    def preset(c):
        c = common.open_clip_towers(common.paper_b16_preset(c), variant)
        c.optim.lr = 1e-5
        c.optim.warmup_steps = 500
        return c

    return preset


PRESETS = {
    "tiny": common.tiny_preset,
    "b16": common.paper_b16_preset,
    "openai_b32": openai_preset("B/32"),
    "openai_b16": openai_preset("B/16"),
    "openai_l14": openai_preset("L/14"),
    # Your own data (input_pipeline.convert): the tiny towers for a CPU try-out, or B/16.
    "web_tiny": lambda c: common.converted_data(common.tiny_preset(c)),
    "web_b16": lambda c: common.converted_data(common.paper_b16_preset(c)),
}


def get_config(arg=None):
    c = common.base_config()
    c.objective = {"name": "softmax_contrastive", "reduction": "mean", "label_smoothing": 0.0}
    c.model.logit_scale_init = math.log(1 / 0.07)
    return common.select_preset("configs/clip.py", arg, PRESETS)(c)
