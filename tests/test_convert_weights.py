"""Weights in and out (mlcd.convert_weights): open_clip / OpenAI checkpoints become mlcd exports
whose embeddings equal open_clip's, and mlcd encoders become open_clip models with the same
embeddings.

The parity tests build randomly initialised open_clip models here (the optional extra
`pip install -e .[torch]`); without it they are skipped with that reason. The layout
mapping, the file formats and the error messages are tested without torch.
"""

import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import SMALL_SCENES
from flax import nnx

import mlcd
from configs import common
from input_pipeline import preprocess
from input_pipeline.tokenizers import load_tokenizer, train_bpe_tokenizer
from mlcd import cluster, convert_weights, export, models, open_clip_format, runs, torch_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # float32 parity bound of the issue; measured differences are ~1e-6

TORCH_REASON = (
    "optional extra not installed: pip install torch==2.14.1 torchvision==0.29.1 -e .[torch] "
    "(see .ci/run) for the open_clip parity tests"
)


# ---- Without torch: layout mapping, file formats, errors ----------------------------------


def our_model_config(**image) -> dict:
    """A small resolved two-tower config with this project's defaults (patch bias, tanh GELU,
    eps 1e-6, no ln_pre), `image` overriding image-tower keys."""
    return {
        "name": "two_tower",
        "image": {
            **open_clip_format.model_config(
                {
                    "embed_dim": 24,
                    "vision_cfg": {
                        "image_size": 16,
                        "patch_size": 4,
                        "width": 32,
                        "layers": 2,
                        "head_width": 16,
                    },
                },
                None,
                None,
            )["image"],
            "ln_pre": False,
            "patch_bias": True,
            "act": "gelu_tanh",
            "ln_eps": 1e-6,
            **image,
        },
        "text": {
            "variant": "tiny",
            "context_length": 12,
            "vocab_size": 64,
            "width": 32,
            "depth": 2,
            "num_heads": 2,
            "mlp_ratio": 4,
            "causal": True,
            "pool": "eos",
            "eos_id": 2,
            "pad_id": 0,
            "act": "gelu_tanh",
            "ln_eps": 1e-6,
        },
        "embed_dim": 24,
        "logit_scale_init": 2.0,
        "logit_bias_init": None,
        "max_logit_scale": 100.0,
        "dtype": "float32",
    }


def random_params(cfg: dict, seed: int = 0) -> dict:
    """The model's init parameters with every leaf perturbed (biases and LayerNorm gains are
    0 / 1 at init, which would hide a mapping that drops or swaps them)."""
    model = models.build_model(cfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.map(np.asarray, jax.tree.unflatten(treedef, noisy))


def apply(cfg: dict, params: dict, images: np.ndarray, tokens: np.ndarray):
    """(image embeddings, text embeddings) of the model, not normalised."""
    model = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    model = nnx.merge(graphdef, state)
    x = jnp.asarray(preprocess.normalize_images(images))
    zimg = model.encode_image(x)["embedding"]
    ztxt = model.encode_text(jnp.asarray(tokens, jnp.int32))["embedding"]
    return np.asarray(zimg), np.asarray(ztxt)


def sample_inputs(image_size: int, context: int, vocab: int, eos: int, seed: int = 0):
    """uint8 images [4, R, R, 3] and token rows of several lengths, each closed by `eos`."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (4, image_size, image_size, 3), dtype=np.uint8)
    tokens = np.zeros((4, context), np.int64)
    for row, length in enumerate((2, 5, context, context // 2)):
        tokens[row, :length] = rng.integers(3, min(vocab, eos) if eos > 3 else vocab, length)
        tokens[row, length - 1] = eos
    return images, tokens


def test_round_trip_through_the_open_clip_layout_keeps_the_outputs():
    # Our defaults that open_clip lacks (a patch bias, folded into the position embeddings;
    # tanh GELU and eps 1e-6, as act_kwargs / norm_kwargs) must survive the round trip.
    cfg = our_model_config()
    params = random_params(cfg)
    state = open_clip_format.state_dict_from_params(params, cfg)
    oc = open_clip_format.open_clip_config(cfg)
    assert oc["vision_cfg"]["act_kwargs"] == {"approximate": "tanh"}
    assert oc["text_cfg"]["norm_kwargs"] == {"eps": 1e-6}
    back_cfg = open_clip_format.model_config(oc, float(state["logit_scale"]), None)
    assert back_cfg["image"]["patch_bias"] is False and back_cfg["image"]["act"] == "gelu_tanh"
    back = open_clip_format.params_from_state_dict(state, back_cfg)
    images, tokens = sample_inputs(16, 12, 64, eos=2)
    for want, got in zip(apply(cfg, params, images, tokens), apply(back_cfg, back, images, tokens)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # Without the folded bias the image embeddings would differ: the fold is what matched.
    assert np.abs(params["image"]["patch_embed"]["bias"]).max() > 0.01


def test_mismatching_checkpoint_lists_the_first_problems():
    cfg = our_model_config()
    state = open_clip_format.state_dict_from_params(random_params(cfg), cfg)
    state["visual.unknown_extra"] = np.zeros(3, np.float32)
    del state["visual.ln_post.bias"]
    wider = our_model_config(width=48, num_heads=3)
    with pytest.raises(ValueError, match="does not match the architecture") as e:
        open_clip_format.params_from_state_dict(state, wider)
    message = str(e.value)
    assert "'visual.conv1.weight': (32, 3, 4, 4) in the checkpoint" in message
    assert "needs (4, 4, 3, 48) for image/patch_embed/kernel" in message
    assert "missing 'visual.ln_post.bias'" in message
    assert "unexpected 'visual.unknown_extra' (3,)" in message
    assert "... and" in message  # more than the first ten problems exist


def small_export(tmp_path, seed: int = 0, text_clean: str | None = None) -> tuple[str, str]:
    """(export dir, tokenizer file) of our_model_config() with random parameters and a small
    BPE tokenizer, written by export.write as mlcd.export writes a run's."""
    tok = train_bpe_tokenizer(["a red circle", "a blue square"] * 10, vocab_size=300)
    tok_path = str(tmp_path / "tokenizer.json")
    with open(tok_path, "w") as f:
        f.write(tok.to_json())
    cfg = our_model_config()
    cfg["text"].update(vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id)
    meta = {"step": 0, "random_init": True, "seed": 0, "model": cfg, "data": {}, "evals": {}}
    meta["preprocess"] = export.preprocess_spec(16, 12, text_clean)
    out = export.write(str(tmp_path / "ours"), random_params(cfg, seed), meta, tok_path)
    return out, tok_path


def assert_embeddings(encoder, images: np.ndarray, texts: list[str], want: tuple) -> None:
    """The encoder's normalised image and text embeddings equal `want` within TOL."""
    np.testing.assert_allclose(encoder.embed_images(images)["embedding"], want[0], atol=TOL)
    np.testing.assert_allclose(encoder.embed_texts(texts)["embedding"], want[1], atol=TOL)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attentional_pool": True}, "vision_cfg.attentional_pool=True is not supported"),
        ({"ls_init_value": 1e-5}, "vision_cfg.ls_init_value=1e-05 is not supported"),
        ({"mlp_ratio": 3.5}, "vision_cfg.mlp_ratio=3.5: the mlcd towers need an integer"),
        ({"timm_model_name": "vit_base"}, "only ViT towers are supported"),
        ({"text": True}, r"text_cfg.no_causal_mask=True \(bidirectional, padding attended\)"),
    ],
)
def test_unsupported_open_clip_settings_are_named(change, message):
    oc = {
        "embed_dim": 8,
        "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1},
    }
    if change.pop("text", False):
        oc["text_cfg"] = {"width": 32, "heads": 2, "layers": 1, "no_causal_mask": True}
    oc["vision_cfg"].update(change)
    with pytest.raises(ValueError, match=message):
        open_clip_format.model_config(oc, None, None)


def test_models_open_clip_cannot_express_are_refused():
    for change, message in [
        ({"pool": "gap"}, "only the patch stem with cls pooling"),
        ({"act": "quick_gelu"}, "quick_gelu switch covers both towers"),
    ]:
        with pytest.raises(ValueError, match=message):
            open_clip_format.open_clip_config(our_model_config(**change))
    bidirectional = our_model_config()
    bidirectional["text"]["causal"] = False  # open_clip's would attend to the padding
    with pytest.raises(ValueError, match=r"only a causal text tower.*causal=False"):
        open_clip_format.open_clip_config(bidirectional)
    with pytest.raises(ValueError, match=r"needs a text tower.*config.model.text=None"):
        open_clip_format.open_clip_config({**our_model_config(), "text": None})


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "f16": rng.normal(size=(7,)).astype(np.float16),
        "bf16": rng.normal(size=(2, 2, 3)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.asarray(2.5, np.float32),
    }
    path = str(tmp_path / "w.safetensors")
    torch_files.write_safetensors(path, tensors)
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
    assert header_length % 8 == 0
    got = torch_files.read_state_dict(path)
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temporary left


def test_a_pickle_that_calls_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = str(tmp_path / "evil.pt")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refers to (posix|os)\.system.*refusing"):
        torch_files.read_state_dict(path)
    (tmp_path / "legacy.pt").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(ValueError, match=r"legacy.pt: neither .safetensors nor a zip archive"):
        torch_files.read_state_dict(str(tmp_path / "legacy.pt"))


def test_activations_and_ln_pre():
    from mlcd.models import layers

    u = jnp.linspace(-4, 4, 81)
    np.testing.assert_allclose(
        layers.activation("quick_gelu", u), u / (1 + np.exp(-1.702 * u)), rtol=1e-5, atol=1e-6
    )
    erf_gelu = 0.5 * u * (1 + jax.scipy.special.erf(u / np.sqrt(2)))
    np.testing.assert_allclose(layers.activation("gelu", u), erf_gelu, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(layers.activation("gelu_tanh", u) - erf_gelu).max()) > 1e-4
    cfg = our_model_config(ln_pre=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5)
    _, abstract = models.abstract_model(cfg)
    assert "ln_pre" in abstract["image"] and "bias" not in abstract["image"]["patch_embed"]
    with pytest.raises(ValueError, match=r"Unknown config\.model\.image\.act='relu'"):
        models.abstract_model(our_model_config(act="relu"))


# ---- With open_clip: parity both ways ------------------------------------------------------


@pytest.fixture(scope="module")
def oc_env():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    open_clip = pytest.importorskip("open_clip", reason=TORCH_REASON)
    vocab = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    return torch, open_clip, vocab


# A small CLIP in open_clip's JSON form: QuickGELU (OpenAI's), 2 heads of width 32 (not
# CLIP's 64, so the shapes alone cannot give the heads: the JSON must), the real vocabulary.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TEXTS = [
    "a photo of a red circle.",
    "",
    "Ünïcödé — “quoted” text, with émojis 🙂 and CJK 漢字!",
    "a very long caption " * 12,
]


def open_clip_model(torch, open_clip, oc: dict, seed: int = 0):
    """open_clip.CLIP for `oc`, eval mode, every parameter perturbed (see random_params)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**oc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_embeddings(torch, model, images: np.ndarray, tokens):
    """L2-normalised (image, text) embeddings of an open_clip model, as NumPy."""
    x = torch.from_numpy(np.asarray(preprocess.normalize_images(images))).permute(0, 3, 1, 2)
    with torch.no_grad():
        zimg = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        ztxt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    return zimg.numpy(), ztxt.numpy()


@pytest.fixture(scope="module")
def imported(oc_env, tmp_path_factory):
    """The tiny open_clip model saved in three formats, each imported through the CLI."""
    torch, open_clip, vocab = oc_env
    model = open_clip_model(torch, open_clip, TINY_OPEN_CLIP)
    root = tmp_path_factory.mktemp("open_clip")
    config = root / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    checkpoints = {"safetensors": str(root / "model.safetensors"), "bin": str(root / "model.bin")}
    from safetensors.torch import save_file

    save_file(model.state_dict(), checkpoints["safetensors"])
    # open_clip's training checkpoints nest the weights, saved from DistributedDataParallel.
    nested = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(nested, checkpoints["bin"])
    exports = {}
    for name, path in checkpoints.items():
        out = str(root / f"export_{name}")
        argv = ["from-open-clip", path, "--out", out, "--tokenizer", vocab]
        assert convert_weights.main([*argv, "--model-config", str(config)]) == 0
        exports[name] = out
    return model, exports, vocab


def test_imported_export_equals_open_clip(oc_env, imported):
    torch, open_clip, _ = oc_env
    model, exports, _ = imported
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=20)
    want_img, want_txt = torch_embeddings(torch, model, images, tokenizer(TEXTS))
    for name, out in exports.items():
        encoder = mlcd.load_encoder(out)
        got_img = encoder.embed_images(images, keys=("embedding",))["embedding"]
        got_txt = encoder.embed_texts(TEXTS)["embedding"]
        np.testing.assert_allclose(got_img, want_img, atol=TOL, err_msg=name)
        np.testing.assert_allclose(got_txt, want_txt, atol=TOL, err_msg=name)
    meta = runs.read_export_meta(exports["bin"])
    assert meta["model"]["image"]["act"] == "quick_gelu" and meta["model"]["image"]["ln_pre"]
    assert meta["model"]["text"]["eos_id"] == 49407  # argmax pooling = CLIP's EOT, the top id


@pytest.mark.filterwarnings("ignore")  # torch.jit.trace's deprecation and tracer warnings
def test_torchscript_checkpoint_imports_with_quick_gelu_and_inferred_shapes(oc_env, tmp_path):
    # OpenAI's released files are TorchScript archives of QuickGELU models with 64-wide heads:
    # no config is needed, the shapes and the format say everything.
    torch, open_clip, vocab = oc_env
    oc = {
        **TINY_OPEN_CLIP,
        "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "width": 128, "head_width": 64},
        "text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "heads": 1},
    }
    model = open_clip_model(torch, open_clip, oc, seed=1)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=20)(TEXTS)
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = torch.zeros(1, 3, 32, 32)
    scripted = torch.jit.trace(model, (x, tokens[:1]), check_trace=False)
    path = str(tmp_path / "ViT-tiny.pt")
    torch.jit.save(scripted, path)
    out = str(tmp_path / "export")
    assert convert_weights.main(["from-open-clip", path, "--out", out, "--tokenizer", vocab]) == 0
    want = torch_embeddings(torch, model, images, tokens)
    assert_embeddings(mlcd.load_encoder(out), images, TEXTS, want)


def test_export_to_open_clip_round_trips_exactly(oc_env, imported, tmp_path):
    _, open_clip, _ = oc_env
    model, exports, _ = imported
    out = str(tmp_path / "open_clip_dir")
    assert convert_weights.main(["to-open-clip", "--checkpoint", exports["bin"], "--out", out]) == 0
    loaded = open_clip.create_model(f"local-dir:{out}").eval()
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)
    # CLIP_benchmark's tokenizer for the directory is CLIP's BPE, as in training.
    assert open_clip.get_tokenizer(f"local-dir:{out}")(["a cat"]).shape == (1, 20)


def test_mlcd_encoder_runs_in_open_clip(oc_env, tmp_path):
    # This project's own architecture (patch bias, tanh GELU, eps 1e-6, its own tokenizer)
    # as an open_clip model: same embeddings from the same token ids.
    torch, open_clip, _ = oc_env
    ours, tok_path = small_export(tmp_path, seed=3)
    out = str(tmp_path / "open_clip_dir")
    assert convert_weights.main(["to-open-clip", "--checkpoint", ours, "--out", out]) == 0
    assert sorted(os.listdir(out)) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "tokenizer.json",
    ]
    loaded = open_clip.create_model(f"local-dir:{out}").eval()
    images = np.random.default_rng(4).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    texts = ["a red circle", "a blue square", "red"]
    tokens = torch.from_numpy(load_tokenizer(tok_path).encode(texts, 12)).long()
    want = torch_embeddings(torch, loaded, images, tokens)
    assert_embeddings(mlcd.load_encoder(ours), images, texts, want)


def test_import_errors_name_the_problem(oc_env, imported, tmp_path):
    _, _, vocab = oc_env
    model, _, _ = imported
    path = str(tmp_path / "model.safetensors")
    from safetensors.torch import save_file

    save_file(model.state_dict(), path)
    wrong = {**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "width": 96}}
    with pytest.raises(ValueError, match=r"'visual.conv1.weight': \(64, 3, 8, 8\) in the ch"):
        convert_weights.import_open_clip(
            path, str(tmp_path / "a"), tokenizer=vocab, model_config=wrong
        )
    with pytest.raises(ValueError, match="--tokenizer is required"):
        convert_weights.import_open_clip(
            path, str(tmp_path / "b"), tokenizer=None, model_config=TINY_OPEN_CLIP
        )
    other = train_bpe_tokenizer(["x y"] * 4, vocab_size=280)
    other_path = str(tmp_path / "other.json")
    with open(other_path, "w") as f:
        f.write(other.to_json())
    with pytest.raises(ValueError, match=r"vocab_size \d+ does not match .* \(49408\)"):
        convert_weights.import_open_clip(
            path, str(tmp_path / "c"), tokenizer=other_path, model_config=TINY_OPEN_CLIP
        )
    assert not any(p.startswith(("a", "b", "c")) for p in os.listdir(tmp_path))


def test_imported_export_is_a_clustering_teacher(oc_env, imported, scenes_dir, tmp_path):
    # teacher.export of mlcd.cluster takes the imported open_clip model like any export.
    _, exports, _ = imported
    out = str(tmp_path / "clusters")
    values = {
        "data.data_dir": scenes_dir,
        **{f"data.build.{k}": v for k, v in SMALL_SCENES.items()},
        "teacher.export": exports["safetensors"],
        "teacher.workdir": "",
        "out_dir": out,
        "verbose": False,
        "kmeans.num_centers": 8,
        "kmeans.iterations": 2,
        "assign.top_l": 2,
    }
    argv = ["--config", os.path.join(ROOT, "configs/cluster.py:tiny")]
    assert cluster.main(argv + [f"--config.{k}={v}" for k, v in values.items()]) == 0
    meta = json.loads(open(os.path.join(out, "clusters.json")).read())
    assert meta["teacher"] == os.path.abspath(exports["safetensors"])
    assert meta["embed_dim"] == 32 and meta["num_centers"] == 8


def test_runs_stored_before_the_tower_switches_resume_unchanged():
    # A run's config.json holds every tower setting (resolved); one written before act /
    # ln_eps / ln_pre / patch_bias existed lacks them, which must not count as a change.
    from types import SimpleNamespace

    from mlcd import train_state

    config = common.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    tokenizer = SimpleNamespace(vocab_size=1024, eos_id=2, pad_id=0)
    resolved = train_state.resolve_model_config(config, tokenizer)
    stored = json.loads(resolved.to_json())
    for tower, keys in {
        "image": ("act", "ln_eps", "ln_pre", "patch_bias"),
        "text": ("act", "ln_eps"),
    }.items():
        for key in keys:
            del stored["model"][tower][key]
    assert common.changed_keys(stored, resolved) == []
    resolved.model.text.act = "quick_gelu"
    assert common.changed_keys(stored, resolved) == [("model.text.act", "gelu_tanh", "quick_gelu")]


@pytest.mark.parametrize(
    "variant, vision, text, embed_dim",
    [
        ("B/32", dict(width=768, layers=12, patch_size=32), dict(width=512, heads=8), 512),
        ("B/16", dict(width=768, layers=12, patch_size=16), dict(width=512, heads=8), 512),
        ("L/14", dict(width=1024, layers=24, patch_size=14), dict(width=768, heads=12), 768),
    ],
)
def test_openai_presets_have_the_imported_architecture(variant, vision, text, embed_dim):
    # What from-open-clip makes of OpenAI's ViT-B/32, B/16 and L/14 (their open_clip configs:
    # 224 px, 77 tokens, 12-layer text tower, QuickGELU) is exactly the resolved model of the
    # configs/clip.py:openai_* preset, so config.init_from loads it into the same network.
    from types import SimpleNamespace

    from mlcd import train_state

    oc = {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, **vision},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "layers": 12, **text},
    }
    imported = open_clip_format.model_config(oc, 4.6, None)
    preset = f"openai_{variant.replace('/', '').lower()}"
    config = common.load_config(os.path.join(ROOT, f"configs/clip.py:{preset}"))
    clip_bpe = SimpleNamespace(vocab_size=49408, eos_id=49407, pad_id=0)
    resolved = train_state.resolve_model_config(config, clip_bpe).model.to_dict()
    for tower in ("image", "text"):
        drop = lambda d: {k: v for k, v in d.items() if k != "variant"}
        assert drop(resolved[tower]) == drop(imported[tower]), tower
    assert resolved["embed_dim"] == imported["embed_dim"]


def test_text_cleaning_travels_with_the_export(tmp_path, scenes_dir):
    # SigLIP-style cleaning (config.pp.text_clean) is recorded in export.json and applied by
    # the loaded encoder's tokenizer; a bad value is refused naming the key.
    from conftest import tiny_overrides

    from mlcd import train

    out, _ = small_export(tmp_path, text_clean="canonicalize")
    encoder = mlcd.load_encoder(out)
    a, b = encoder.embed_texts(["A red, circle!", "a red circle"])["embedding"]
    np.testing.assert_array_equal(a, b)  # punctuation and case removed before tokenizing

    config = common.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    common.parse_overrides(config, tiny_overrides(scenes_dir, **{"pp.text_clean": "bogus"}))
    with pytest.raises(ValueError, match=r"config.pp.text_clean: text_clean must be one of"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
