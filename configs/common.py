"""Shared config defaults and the config-argument parser.

A run is described by `--config path/to/file.py:preset` plus any number of
`--config.key.sub=value` overrides (big_vision style). Each config file defines
`get_config(arg: str | None) -> ml_collections.ConfigDict`; the text after ':' is the preset.

Overrides are type-checked against the existing value, and a key that does not exist is an
error that names it (with the closest existing keys), so a typo never silently trains the
default.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

PRESET_SEPARATOR = ":"
# Evaluator types that embed images only (the others need a text tower).
IMAGE_ONLY_EVAL_TYPES = ("fewshot", "linear_probe", "image_retrieval")


# Keys added to the resolved config after runs had been written without them, each with the
# value that reproduces the code before it: a stored config.json that lacks the key equals one
# holding this value, so resuming or evaluating such a run is not a config change.
ADDED_KEYS = {
    "model.image.patch_proj": "shared",
    "model.image.act": "gelu_tanh",
    "model.image.ln_eps": 1e-6,
    "model.image.ln_pre": False,
    "model.image.patch_bias": True,
    "model.text.act": "gelu_tanh",
    "model.text.ln_eps": 1e-6,
    "model.remat": "none",
    "model.attention": "xla",
}


def image_tower(variant: str) -> ml_collections.ConfigDict:
    """config.model.image of a ViT `variant` (mlcd/models/vit.py VARIANTS) with the settings a
    config may change: pool 'cls' | 'gap' | 'map'; stem 'patch' (ViT) or 'conv' (a
    convolutional stem, ConvStem); patch_proj 'shared' (patch tokens reach the embedding space
    through the pooled embedding's projection) or 'separate' (a projection of their own)."""
    return ml_collections.ConfigDict(
        {"variant": variant, "pool": "cls", "stem": "patch", "patch_proj": "shared"}
    )


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every method; each config file starts from this and edits it."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Pretrained weights to start a fresh run from: an mlcd export (python -m mlcd.export or
    # mlcd.convert_weights) or a training run directory (its latest checkpoint). Only the
    # model's parameters are loaded, into this config's architecture and shardings; the
    # objective's heads and the optimizer start fresh at step 0, and a resumed run continues
    # from its own checkpoint without reading init_from. None: everything from config.seed.
    c.init_from = ml_collections.config_dict.placeholder(str)
    # Regex (full match) of parameter paths, e.g. 'text/.*' or 't|b', that keep their fresh
    # initialisation instead of being loaded from init_from. None: load every parameter.
    c.init_from_skip = ml_collections.config_dict.placeholder(str)
    c.total_steps = 1000
    c.batch_size = 256  # global batch, split over all devices
    # Gradient accumulation: the step's batch in this many sequential slices, for memory. Only
    # for per-example objectives (MLCD, MOFI classifier); in-batch contrastive ones refuse > 1.
    c.microbatches = 1
    # Mesh axes (name, size); one size may be -1 ("all remaining devices").
    c.mesh = (("data", -1), ("model", 1))
    # (regex over parameter paths such as 'image/blocks/0/mlp/fc1/kernel', spec) pairs, first
    # match wins. spec: 'replicate', 'fsdp' (largest divisible dim over the 'data' axis),
    # 'partial_fc' (dim 0 over every axis) or a tuple of mesh-axis names / None per dimension.
    # The objective's heads come with their own layout.
    c.sharding_rules = ((".*", "replicate"),)
    # Multi-host: jax.distributed.initialize(**set fields). On TPU pods / SLURM / GKE the fields
    # can stay unset (auto-detected); a local multi-process CPU run sets all three.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
    c.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    c.distributed.process_id = ml_collections.config_dict.placeholder(int)

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_scenes"
    c.data.data_dir = "data"
    c.data.build = ml_collections.ConfigDict()  # kwargs of the builder (sizes, seed, resolution)
    c.data.split = "train"
    # The caption field(s) to train on; with several, each example draws one uniformly at
    # random (seeded per example, so a resumed run draws the same).
    c.data.text_keys = ("long_caption",)
    # Examples whose record cannot be read (a corrupted shard) or whose image cannot be decoded
    # are dropped and counted (data/skipped_examples); past this many the run stops, naming it.
    c.data.max_skipped = 1000
    c.data.num_threads = 2  # grain reader threads per host
    c.data.prefetch = 4

    c.pp = ml_collections.ConfigDict()
    # Per-example train transforms, in order (input_pipeline/transforms.py): each reads and
    # writes named fields; the batch keeps the objective's inputs. Ops take their defaults from
    # the keys below ('name(key=value)' overrides one).
    c.pp.ops = ("random_resized_crop", "flip_lr", "choose_text", "tokenize")
    c.pp.image_size = 224
    c.pp.crop_scale = (0.5, 1.0)  # random-resized-crop area range (train only)
    c.pp.context_length = 77
    # Tokenizer file (input_pipeline/tokenizers.py): a HuggingFace tokenizer.json, a
    # sentencepiece .model, or OpenAI CLIP's BPE merges bpe_simple_vocab_16e6.txt.gz (.txt.gz or
    # .txt; ids equal open_clip's). None: the dataset's own tokenizer.json.
    c.tokenizer = ml_collections.config_dict.placeholder(str)
    # Text cleaning before tokenizing (input_pipeline/tokenizers.py TEXT_CLEANERS): 'none',
    # 'whitespace', 'lower' or 'canonicalize' (big_vision's, open_clip's for SigLIP: lower-case,
    # punctuation removed). None: 'lower' for CLIP's BPE (as open_clip), 'none' otherwise.
    c.pp.text_clean = ml_collections.config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict()
    c.model.name = "two_tower"  # mlcd.models.MODELS
    c.model.image = image_tower("B/16")
    c.model.text = ml_collections.ConfigDict({"variant": "B", "causal": True, "pool": "eos"})
    c.model.embed_dim = 512
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.logit_bias_init = ml_collections.config_dict.placeholder(float)
    c.model.max_logit_scale = 100.0
    c.model.dtype = "float32"
    # Memory and speed on accelerators (docs/architecture.md, "Remat, attention and dtype"); the
    # parameters are the same either way. remat: 'none' | 'full' | 'dots_saveable', what each
    # encoder block recomputes in the backward pass. attention: 'xla' (einsum + float32
    # softmax) | 'fused' (jax.nn.dot_product_attention: cuDNN flash attention on GPU in bf16).
    c.model.remat = "none"
    c.model.attention = "xla"
    # config.objective (name + the method's own settings) is set by each method's config file.

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.0  # cosine decays to lr * min_lr_ratio
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    # Parameters whose path matches are not decayed (norm gains, biases, embeddings of scalars).
    c.optim.no_decay = r".*(bias|scale|norm.*|logit_scale|logit_bias|cls_token|pos_embed.*)$"
    c.optim.grad_clip_norm = 1.0
    # ((regex, multiplier), ...) over model parameter paths (0 freezes); heads bring their own.
    c.optim.lr_mults = ()

    c.log_every = 10
    c.ckpt_every = 200
    c.keep_ckpts = 2
    # Divergence guard: a step whose loss, gradients or updated parameters are not finite
    # leaves the state unchanged (counted as train/nonfinite), so no checkpoint is ever
    # non-finite; after max_consecutive such steps in a row the run stops, naming the first
    # (1: stop at the first one; 0: never stop, only skip and count).
    c.nonfinite = ml_collections.ConfigDict({"max_consecutive": 10})
    # Periodic evaluation every N steps; an evaluator's own `every` overrides it: 0 = after the
    # last step only, < 0 = never.
    c.eval_every = 500
    c.evals = ml_collections.ConfigDict()
    return c


def labelling_config(out_dir: str) -> ml_collections.ConfigDict:
    """What the labelling tools (python -m mlcd.cluster, mlcd.annotate) share: out_dir, verbose,
    the teacher and the split to label; each tool's config adds its own keys."""
    c = ml_collections.ConfigDict()
    c.out_dir = out_dir
    c.verbose = True  # progress bars (tqdm: rate and ETA) for every stage

    # Exactly one of: an export directory (python -m mlcd.export) or a training run directory
    # (its checkpoint at `step`, default the latest).
    c.teacher = ml_collections.ConfigDict()
    c.teacher.export = ml_collections.config_dict.placeholder(str)
    c.teacher.workdir = ml_collections.config_dict.placeholder(str)
    c.teacher.step = ml_collections.config_dict.placeholder(int)

    # Every example of `split` (tfds slicing, e.g. 'train[:10%]') gets a row of labels, keyed by
    # its string feature 'id'.
    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_scenes"
    c.data.data_dir = "data"
    c.data.build = ml_collections.ConfigDict()  # kwargs of a buildable dataset's builder
    c.data.split = "train"
    c.data.num_threads = 4  # image decoding threads (does not change the results)
    return c


def load_module(path: str) -> Any:
    """Imports a config file by path (config files need not be on sys.path)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: config file {path!r} does not exist")
    name = "mlcd_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:preset]` by calling its `get_config(preset)`."""
    path, _, preset = spec.partition(PRESET_SEPARATOR)
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config: {path} defines no get_config(preset)")
    return module.get_config(preset or None)


def changed_keys(
    before: dict[str, Any], now: ml_collections.ConfigDict, ignore: Sequence[str] = ()
) -> list[tuple[str, Any, Any]]:
    """(key, stored value, new value) of every dotted key whose value differs between a stored
    config (the JSON of `config.to_json()`, as a dict) and `now`, skipping keys equal to or
    under an entry of `ignore` (e.g. 'evals' ignores every 'evals.*'). Sorted by key."""
    flat = lambda d, prefix="": {
        k2: v2
        for k, v in d.items()
        for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}).items()
    }
    # A JSON round trip makes tuples lists, as in the stored file.
    old, new = flat(before), flat(json.loads(now.to_json()))
    skip = lambda k: any(k == p or k.startswith(p + ".") for p in ignore)
    old = {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **old}
    return [
        (k, old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not skip(k)
    ]


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _parse_value(key: str, text: str, current: Any, field_type: type | None) -> Any:
    """Converts an override string to the type of the value it replaces."""
    target = field_type if current is None else type(current)
    if target is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}: expected a bool, got {text!r}")
    if target is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if target is None:
            return text  # an unset field without a declared type takes the string as is
        raise ValueError(f"--config.{key}: cannot parse {text!r} as {target.__name__}") from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target in (tuple, list) and isinstance(value, list | tuple):
        return target(value)
    if target is not None and not isinstance(value, target):
        raise ValueError(
            f"--config.{key}: expected {target.__name__}, got {text!r} ({type(value).__name__})"
        )
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets `config.<key>` (dotted) from its string form; an unknown key raises KeyError."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            _unknown_key(config, ".".join(parents[: i + 1]))
        node = child
    if leaf not in node:
        _unknown_key(config, key)
    field_type = node.get_type(leaf)
    if field_type is type(None):
        field_type = None
    node[leaf] = _parse_value(key, text, node[leaf], field_type)


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> None:
    close = difflib.get_close_matches(key, _all_keys(config), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise KeyError(f"--config.{key}: unknown config key.{hint}")


def parse_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """Applies `--config.a.b=value` / `--config.a.b value` arguments in order."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--config."):
            raise ValueError(f"unrecognised argument {arg!r} (overrides look like --config.key=v)")
        body = arg[len("--config.") :]
        if "=" in body:
            key, text = body.split("=", 1)
        elif i + 1 < len(argv):
            key, text = body, argv[i + 1]
            i += 1
        else:
            raise ValueError(f"{arg}: missing value")
        apply_override(config, key, text)
        i += 1


def _image_text_evals() -> dict[str, dict[str, Any]]:
    """Zero-shot (shape, colour) and retrieval on the synthetic_scenes test split."""
    return {
        "zeroshot": {"type": "zeroshot", "split": "test", "tasks": ("shape", "color")},
        "retrieval": {"type": "retrieval", "split": "test", "caption_key": "long_caption"},
    }


def converted_data(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Points a preset at a dataset written by `python -m input_pipeline.convert` (docs/data.md):
    give --config.data.name, --config.data.data_dir and --config.tokenizer (e.g. CLIP's
    bpe_simple_vocab_16e6.txt.gz). Nothing is built and training reads its 'caption'. The one
    evaluator, image-text retrieval on the dataset's 'validation' split (its first 1,000
    examples), is off until that split exists: --config.evals.retrieval.every=N (0: after the
    last step only)."""
    c.data.name = ml_collections.config_dict.placeholder(str)
    c.data.build = ml_collections.ConfigDict()
    c.data.text_keys = ("caption",)
    c.evals = ml_collections.ConfigDict(
        {
            "retrieval": {
                "type": "retrieval",
                "split": "validation",
                "caption_key": "caption",
                "max_examples": 1000,
                "every": -1,
            }
        }
    )
    return c


def tiny_preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU try-out: synthetic_scenes, tiny towers, a few minutes on 2 cores.

    Shared by clip.py / align.py / siglip.py so their tiny runs differ only in the objective.
    """
    # 300 steps x 128: colour zero-shot and retrieval plateau by step 200 (measured: colour 0.996,
    # R@1 0.40 both ways); the whole job (build, train, all evaluators) fits in ~10 min on 2 cores.
    c.total_steps = 300
    c.batch_size = 128
    c.data.build = ml_collections.ConfigDict(
        {"train_size": 20000, "validation_size": 1000, "test_size": 2000, "image_size": 64}
    )
    c.pp.image_size = 64
    c.pp.crop_scale = (0.8, 1.0)  # mild: a crop must not cut away objects the caption names
    # No flip_lr: captions name positions ("on the left"), a flip would contradict them.
    c.pp.ops = tuple(op for op in c.pp.ops if op != "flip_lr")
    c.pp.context_length = 48
    c.model.image = image_tower("tiny")
    c.model.text = ml_collections.ConfigDict({"variant": "tiny", "causal": True, "pool": "eos"})
    c.model.embed_dim = 128
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 40
    c.optim.weight_decay = 0.05
    c.log_every = 20
    c.ckpt_every = 100
    c.eval_every = 150
    c.evals = ml_collections.ConfigDict(
        {
            **_image_text_evals(),
            # Frozen-feature evaluators, after the last step only (every=0).
            "fewshot": {"type": "fewshot", "every": 0},
            "linear_probe": {"type": "linear_probe", "every": 0},
            "digits": {"type": "linear_probe", "dataset": "digits", "every": 0},
            "image_retrieval": {"type": "image_retrieval", "every": 0},
            # Looser relevance: the same largest object's entity (colour + shape).
            "image_retrieval_largest": {
                "type": "image_retrieval",
                "relevance": "first",
                "name": "test_largest",
                "every": 0,
            },
            "grounding": {"type": "grounding", "every": 0},
            # Dense and sentence-level (DreamLIP's claims): each long-caption sentence queries
            # the images; zero-shot segmentation from the projected patch tokens.
            "retrieval_sentences": {
                "type": "retrieval",
                "split": "test",
                "caption_key": "long_caption",
                "sentences": True,
                "name": "test_sentences",
                "ks": (1, 5),
                "every": 0,
            },
            "segmentation": {"type": "segmentation", "every": 0},
        }
    )
    return c


def image_only_evals(evals: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The entries of `evals` whose evaluators need no text tower (frozen-feature probes and
    image retrieval; zero-shot, image-text retrieval and grounding embed texts)."""
    return ml_collections.ConfigDict(
        {k: v.to_dict() for k, v in evals.items() if v.type in IMAGE_ONLY_EVAL_TYPES}
    )


def paper_b16_preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ViT-B/16 at CLIP's paper scale (224 px, 77 tokens, batch 32K, AdamW, wd 0.2), FSDP, bf16.

    remat 'dots_saveable': without it the step's activations need ~105 GiB per device at 64
    devices (512 images each); keeping only the projection / MLP matmul outputs brings CLIP,
    MOFI and DreamLIP to 28-39 GiB for ~2% more FLOPs ('full' remat: 12-18 GiB, +22%;
    bench/dry_run.py --remat_search, docs/benchmarks.md)."""
    c.total_steps = 400_000
    c.batch_size = 32_768
    c.pp.image_size = 224
    c.pp.crop_scale = (0.9, 1.0)
    c.pp.context_length = 77
    c.model.image = image_tower("B/16")
    c.model.text = ml_collections.ConfigDict({"variant": "B/16", "causal": True, "pool": "eos"})
    c.model.embed_dim = 512
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_saveable"
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.2
    c.sharding_rules = ((".*", "fsdp"),)
    c.log_every = 100
    c.ckpt_every = 2000
    c.eval_every = 10_000
    c.evals = ml_collections.ConfigDict(_image_text_evals())
    return c


def open_clip_towers(
    c: ml_collections.ConfigDict, variant: str, act: str = "quick_gelu"
) -> ml_collections.ConfigDict:
    """Sets config.model to the towers of OpenAI's / open_clip's ViT-`variant` CLIP (B/32, B/16,
    L/14), the architecture `python -m mlcd.convert_weights from-open-clip` imports, so that
    `config.init_from` can load such an export: LayerNorm eps 1e-5 (PyTorch's), a LayerNorm
    before the image blocks (ln_pre), no patch-embedding bias, and `act` in both towers
    ('quick_gelu' for OpenAI's weights, 'gelu' for open_clip's LAION / DataComp ones)."""
    c.model.image = image_tower(variant)
    c.model.image.update(act=act, ln_eps=1e-5, ln_pre=True, patch_bias=False)
    c.model.text = ml_collections.ConfigDict(
        {"variant": variant, "causal": True, "pool": "eos", "act": act, "ln_eps": 1e-5}
    )
    c.model.embed_dim = 768 if variant == "L/14" else 512
    return c


def select_preset(path: str, arg: str | None, presets: dict[str, Any]) -> Any:
    """presets[arg] (default: the first), or an error naming the config file and its presets."""
    name = arg or next(iter(presets))
    if name not in presets:
        raise ValueError(f"--config {path}:{name}: unknown preset; known: {', '.join(presets)}")
    return presets[name]
