"""open_clip / OpenAI CLIP weights <-> this project's two-tower parameters.

Both layouts hold the same transformer; they differ in names, in the orientation of matrices
and in a few architecture switches, each of which the towers have behind config:

    open_clip (PyTorch state dict)               mlcd (parameter path)
    visual.conv1.weight  [W, 3, P, P]            image/patch_embed/kernel [P, P, 3, W]
    visual.class_embedding [W]                   image/cls [1, 1, W]
    visual.positional_embedding [N + 1, W]       image/pos_embed [1, N + 1, W]
    visual.ln_pre.{weight, bias}                 image/ln_pre/{scale, bias}    (ln_pre=True)
    *.transformer.resblocks.<i>.ln_1             */blocks/<i>/ln1
    *.attn.in_proj_weight [3W, W] (+ _bias)      */blocks/<i>/attn/qkv/kernel [W, 3W] (+ bias)
    *.attn.out_proj.{weight, bias}               */blocks/<i>/attn/out/{kernel^T, bias}
    *.ln_2, *.mlp.c_fc, *.mlp.c_proj             */blocks/<i>/ln2, mlp/fc1, mlp/fc2 (kernel^T)
    visual.ln_post, visual.proj [W, E]           image/norm, image/proj/kernel [W, E]
    token_embedding.weight [V, W]                text/token_embed/embedding
    positional_embedding [L, W]                  text/pos_embed
    ln_final, text_projection [W, E]             text/norm, text/proj/kernel
    logit_scale (log of the scale), logit_bias   t, b

PyTorch's Linear stores [out, in] and computes x W^T, hence the transposes. in_proj_weight's
rows are (q | k | v) x heads x head_dim, the layout of our qkv kernel's columns, so the
transpose is the whole mapping. The switches: QuickGELU (OpenAI's weights) or exact GELU
(open_clip's own runs) for `act`, LayerNorm eps 1e-5 (PyTorch's default), `ln_pre`, no patch
bias, causal text attention and pooling at the end-of-text token.

Text pooling: open_clip's default 'argmax' pools where the token id is largest, which is the
end-of-text token because CLIP's BPE gives it the largest id (49407). It is imported as our
'eos' pooling at eos_id = vocab_size - 1, which is the same position for every sequence its
tokenizer makes. open_clip's 'eos' pooling (tokenizers whose EOS is not the largest id) maps
to ours directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mlcd import models, tree_utils

# How many mismatching names an error lists.
_SHOWN = 10

_IDENTITY = (lambda a: a, lambda a: a)
_TRANSPOSE = (lambda a: a.T, lambda a: a.T)
# [W, 3, P, P] (PyTorch conv, out/in/kh/kw) <-> [P, P, 3, W] (ours, kh/kw/in/out).
_CONV = (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
_ADD_BATCH = (lambda a: a[None], lambda a: a[0])
_CLS = (lambda a: a.reshape(1, 1, -1), lambda a: a.reshape(-1))

Rule = tuple[str, str, tuple[Callable, Callable]]  # (open_clip name, our path, (in, out))


def _block_rules(torch_prefix: str, our_prefix: str, depth: int) -> list[Rule]:
    rules = []
    for i in range(depth):
        t, o = f"{torch_prefix}transformer.resblocks.{i}.", f"{our_prefix}blocks/{i}/"
        rules += [
            (t + "ln_1.weight", o + "ln1/scale", _IDENTITY),
            (t + "ln_1.bias", o + "ln1/bias", _IDENTITY),
            (t + "attn.in_proj_weight", o + "attn/qkv/kernel", _TRANSPOSE),
            (t + "attn.in_proj_bias", o + "attn/qkv/bias", _IDENTITY),
            (t + "attn.out_proj.weight", o + "attn/out/kernel", _TRANSPOSE),
            (t + "attn.out_proj.bias", o + "attn/out/bias", _IDENTITY),
            (t + "ln_2.weight", o + "ln2/scale", _IDENTITY),
            (t + "ln_2.bias", o + "ln2/bias", _IDENTITY),
            (t + "mlp.c_fc.weight", o + "mlp/fc1/kernel", _TRANSPOSE),
            (t + "mlp.c_fc.bias", o + "mlp/fc1/bias", _IDENTITY),
            (t + "mlp.c_proj.weight", o + "mlp/fc2/kernel", _TRANSPOSE),
            (t + "mlp.c_proj.bias", o + "mlp/fc2/bias", _IDENTITY),
        ]
    return rules


def rules(model_cfg: Mapping[str, Any], text_prefix: str = "") -> list[Rule]:
    """The name mapping for our (resolved) model config: image tower, text tower if any, and
    the logit scale / bias the model has. text_prefix is 'text.' for open_clip's
    CustomTextCLIP layout, '' for CLIP's."""
    image = model_cfg["image"]
    out: list[Rule] = [
        ("visual.conv1.weight", "image/patch_embed/kernel", _CONV),
        ("visual.class_embedding", "image/cls", _CLS),
        ("visual.positional_embedding", "image/pos_embed", _ADD_BATCH),
    ]
    if image["ln_pre"]:
        out += [
            ("visual.ln_pre.weight", "image/ln_pre/scale", _IDENTITY),
            ("visual.ln_pre.bias", "image/ln_pre/bias", _IDENTITY),
        ]
    out += _block_rules("visual.", "image/", image["depth"])
    out += [
        ("visual.ln_post.weight", "image/norm/scale", _IDENTITY),
        ("visual.ln_post.bias", "image/norm/bias", _IDENTITY),
        ("visual.proj", "image/proj/kernel", _IDENTITY),
    ]
    if model_cfg.get("text") is not None:
        p = text_prefix
        out += [
            (p + "token_embedding.weight", "text/token_embed/embedding", _IDENTITY),
            (p + "positional_embedding", "text/pos_embed", _IDENTITY),
        ]
        out += _block_rules(p, "text/", model_cfg["text"]["depth"])
        out += [
            (p + "ln_final.weight", "text/norm/scale", _IDENTITY),
            (p + "ln_final.bias", "text/norm/bias", _IDENTITY),
            (p + "text_projection", "text/proj/kernel", _IDENTITY),
        ]
    if model_cfg.get("logit_scale_init") is not None:
        out.append(("logit_scale", "t", _IDENTITY))
    if model_cfg.get("logit_bias_init") is not None:
        out.append(("logit_bias", "b", _IDENTITY))
    return out


# Buffers in some state dicts that are recomputed from the config (OpenAI's causal mask).
_BUFFERS = ("attn_mask", "text.attn_mask", "visual.attn_mask")


def _act(quick_gelu: bool, tower_cfg: Mapping[str, Any], where: str) -> str:
    if quick_gelu:
        return "quick_gelu"
    approximate = (tower_cfg.get("act_kwargs") or {}).get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{where}.act_kwargs.approximate={approximate!r} is not supported")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _eps(tower_cfg: Mapping[str, Any]) -> float:
    return float((tower_cfg.get("norm_kwargs") or {}).get("eps", 1e-5))


def _refuse(cfg: Mapping[str, Any], where: str, checks: Mapping[str, Any]) -> None:
    """ValueError for the first setting of `cfg` that differs from what we support."""
    for key, supported in checks.items():
        if key in cfg and cfg[key] not in (
            supported if isinstance(supported, tuple) else (supported,)
        ):
            raise ValueError(
                f"open_clip {where}.{key}={cfg[key]!r} is not supported by the mlcd towers "
                f"(supported: {supported!r})"
            )


def infer_open_clip_config(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """An open_clip model config ({'embed_dim', 'quick_gelu', 'vision_cfg', 'text_cfg'}) read
    off a state dict's shapes, as open_clip does for OpenAI checkpoints: heads = width / 64
    (CLIP's head width), mlp_ratio from the MLP's width, exact GELU and eps 1e-5 (set
    quick_gelu=True for OpenAI's weights: the shapes cannot tell)."""

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})

    if "visual.conv1.weight" not in state:
        raise ValueError(
            "not an open_clip / OpenAI ViT checkpoint: 'visual.conv1.weight' is missing (first "
            f"keys: {sorted(state)[:_SHOWN]})"
        )
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = {
        "image_size": grid * patch,
        "patch_size": patch,
        "width": width,
        "layers": count("visual.transformer.resblocks."),
        "head_width": 64,
        "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        "no_ln_pre": "visual.ln_pre.weight" not in state,
    }
    out = {"embed_dim": int(state["visual.proj"].shape[1]), "quick_gelu": False}
    out["vision_cfg"] = vision
    p = "text." if "text.token_embedding.weight" in state else ""
    if p + "token_embedding.weight" in state:
        vocab, twidth = state[p + "token_embedding.weight"].shape
        out["text_cfg"] = {
            "context_length": int(state[p + "positional_embedding"].shape[0]),
            "vocab_size": int(vocab),
            "width": int(twidth),
            "heads": int(twidth) // 64,
            "layers": count(p + "transformer.resblocks."),
            "mlp_ratio": state[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / twidth,
        }
    return out


def model_config(
    oc: Mapping[str, Any], logit_scale: float | None, logit_bias: float | None
) -> dict[str, Any]:
    """Our resolved two-tower model config for an open_clip model config `oc` (its
    'model_cfg', as in open_clip's JSON files). Settings the towers cannot reproduce are a
    ValueError naming the open_clip key."""
    vision, text = dict(oc["vision_cfg"]), oc.get("text_cfg")
    if isinstance(vision.get("layers"), (list, tuple)) or vision.get("timm_model_name"):
        raise ValueError("open_clip vision_cfg: only ViT towers are supported (not ResNet / timm)")
    _refuse(
        vision,
        "vision_cfg",
        {
            "attentional_pool": False,
            "ls_init_value": None,
            "pool_type": "tok",
            "pos_embed_type": "learnable",
            "qk_norm": False,
            "scaled_cosine_attn": False,
            "scale_heads": False,
            "scale_attn": False,
            "scale_fc": False,
        },
    )
    quick = bool(oc.get("quick_gelu", False))
    width = int(vision["width"])
    mlp = float(vision.get("mlp_ratio", 4.0))
    heads = width // int(vision.get("head_width", 64))
    image = {
        "variant": "B/16",  # every setting is given below; the name only has to exist
        "image_size": int(vision["image_size"]),
        "patch_size": int(vision["patch_size"]),
        "width": width,
        "depth": int(vision["layers"]),
        "num_heads": heads,
        "mlp_ratio": _int_ratio(mlp, "vision_cfg.mlp_ratio"),
        "pool": "cls",
        "stem": "patch",
        "patch_proj": "shared",
        "act": _act(quick, vision, "vision_cfg"),
        "ln_eps": _eps(vision),
        "ln_pre": not vision.get("no_ln_pre", False),
        "patch_bias": False,
    }
    cfg: dict[str, Any] = {
        "name": "two_tower",
        "image": image,
        "text": None,
        "embed_dim": int(oc["embed_dim"]),
        "logit_scale_init": logit_scale,
        "logit_bias_init": logit_bias,
        "max_logit_scale": 100.0,
        "dtype": "float32",
    }
    if text is not None:
        text = dict(text)
        if text.get("hf_model_name") or text.get("embed_cls"):
            raise ValueError("open_clip text_cfg: only the CLIP text transformer is supported")
        _refuse(
            text,
            "text_cfg",
            {
                "ls_init_value": None,
                "pool_type": ("argmax", "eos", "first"),
                "proj_type": "linear",
                "proj_bias": False,
                "qk_norm": False,
            },
        )
        if text.get("no_causal_mask", False):
            raise ValueError(
                "open_clip text_cfg.no_causal_mask=True (bidirectional, padding attended) is not "
                "supported: the mlcd text tower masks padding when it is bidirectional"
            )
        vocab = int(text.get("vocab_size", 49408))
        pool = text.get("pool_type", "argmax")
        cfg["text"] = {
            "variant": "B",
            "context_length": int(text.get("context_length", 77)),
            "vocab_size": vocab,
            "width": int(text["width"]),
            "depth": int(text["layers"]),
            "num_heads": int(text["heads"]),
            "mlp_ratio": _int_ratio(float(text.get("mlp_ratio", 4.0)), "text_cfg.mlp_ratio"),
            "causal": True,
            "pool": "first" if pool == "first" else "eos",
            # argmax pools at the largest id: CLIP's end-of-text token (see the module doc).
            "eos_id": vocab - 1 if pool == "argmax" else int(text.get("eos_id", 2)),
            "pad_id": int(text.get("pad_id", 0)),
            "act": _act(quick, text, "text_cfg"),
            "ln_eps": _eps(text),
        }
    return cfg


def _int_ratio(ratio: float, key: str) -> int:
    if ratio != int(ratio):
        raise ValueError(f"open_clip {key}={ratio}: the mlcd towers need an integer MLP ratio")
    return int(ratio)


def params_from_state_dict(
    state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any]
) -> dict[str, Any]:
    """Our parameter tree (float32 NumPy, nested like models.abstract_model's) for
    `model_cfg` from an open_clip state dict.

    Raises ValueError listing the first missing names, unexpected names and shape mismatches
    (with both shapes) when the checkpoint does not fit the architecture.
    """
    text_prefix = "text." if "text.token_embedding.weight" in state else ""
    table = rules(model_cfg, text_prefix)
    _, abstract = models.abstract_model(model_cfg)
    want = tree_utils.shapes(abstract)
    flat, missing, mismatched = {}, [], []
    for name, path, (to_ours, _) in table:
        if name not in state:
            missing.append(f"missing {name!r} (for {path}, shape {want[path]})")
            continue
        value = to_ours(np.asarray(state[name], np.float32))
        if value.shape != want[path]:
            mismatched.append(
                f"{name!r}: {tuple(state[name].shape)} in the checkpoint, the architecture "
                f"needs {want[path]} for {path}"
            )
        flat[path] = value
    known = {name for name, _, _ in table} | set(_BUFFERS)
    unexpected = [
        f"unexpected {name!r} {tuple(state[name].shape)}" for name in sorted(set(state) - known)
    ]
    # Missing and unexpected names first: they say most about what the checkpoint is.
    problems = missing + unexpected + mismatched
    if problems:
        shown = "\n  ".join(problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise ValueError(
            f"the checkpoint does not match the architecture ({len(problems)} problems):\n  "
            f"{shown}{more}"
        )
    return tree_utils.map_with_path(lambda path, _: flat[path], abstract)


def open_clip_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The open_clip model config ('model_cfg') of our resolved two-tower config: what
    open_clip needs to build the same network. ValueError for a tower it cannot express."""
    image, text = model_cfg["image"], model_cfg.get("text")
    if text is None:
        raise ValueError(
            "open_clip's CLIP needs a text tower; this model has none (config.model.text=None)"
        )
    if image["stem"] != "patch" or image["pool"] != "cls":
        raise ValueError(
            f"open_clip cannot express model.image.stem={image['stem']!r} / "
            f"pool={image['pool']!r}: only the patch stem with cls pooling"
        )
    if text["pool"] == "mean" or not text["causal"]:
        # open_clip's bidirectional text tower attends to padding (its config has no switch
        # for the padding mask ours applies), so its outputs would differ.
        raise ValueError(
            "open_clip can express only a causal text tower pooled at 'eos' or 'first'; got "
            f"model.text.causal={text['causal']}, pool={text['pool']!r}"
        )
    acts = {image["act"], text["act"]}
    quick = acts == {"quick_gelu"}
    if "quick_gelu" in acts and not quick:
        raise ValueError(
            "open_clip's quick_gelu switch covers both towers; model.image.act and "
            f"model.text.act differ ({image['act']!r}, {text['act']!r})"
        )

    def tower(cfg: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"norm_kwargs": {"eps": cfg["ln_eps"]}}
        if cfg["act"] == "gelu_tanh":
            out["act_kwargs"] = {"approximate": "tanh"}
        return out

    vision = {
        "image_size": image["image_size"],
        "patch_size": image["patch_size"],
        "width": image["width"],
        "layers": image["depth"],
        "head_width": int(image["width"] // image["num_heads"]),
        "mlp_ratio": float(image["mlp_ratio"]),
        "no_ln_pre": not image["ln_pre"],
        "pool_type": "tok",
        **tower(image),
    }
    text_cfg = {
        "context_length": text["context_length"],
        "vocab_size": text["vocab_size"],
        "width": text["width"],
        "heads": text["num_heads"],
        "layers": text["depth"],
        "mlp_ratio": float(text["mlp_ratio"]),
        "pool_type": "first" if text["pool"] == "first" else "eos",
        "eos_id": text["eos_id"],
        "pad_id": text["pad_id"],
        **tower(text),
    }
    out = {"embed_dim": model_cfg["embed_dim"], "quick_gelu": quick}
    out.update(vision_cfg=vision, text_cfg=text_cfg)
    if model_cfg.get("logit_bias_init") is not None:
        out["init_logit_bias"] = model_cfg["logit_bias_init"]
    return out


def state_dict_from_params(
    params: Mapping[str, Any], model_cfg: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The open_clip state dict (float32 NumPy) of our parameters.

    A patch-embedding bias, which open_clip's conv1 lacks, is folded into the position
    embeddings of the patch tokens: conv(x) + b + pos_i = conv(x) + (pos_i + b), exactly.
    The 'separate' patch projection, which open_clip has no place for, is left out (only the
    pooled embedding's `proj` is exported).
    """
    flat = {path: np.asarray(v, np.float32) for path, v in tree_utils.flatten(params).items()}
    state = {}
    for name, path, (_, to_torch) in rules(model_cfg):
        state[name] = np.array(to_torch(flat[path]), order="C")  # 0-d stays 0-d
    if "image/patch_embed/bias" in flat:
        pos = state["visual.positional_embedding"].copy()
        pos[1:] += flat["image/patch_embed/bias"]
        state["visual.positional_embedding"] = pos
    if "t" not in flat:  # open_clip's CLIP always has a logit scale
        state["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
    return state
