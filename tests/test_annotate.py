"""python -m mlcd.annotate on the small synthetic_scenes build, with a random-init CLIP teacher.

256 train examples in 4 shards of 64; the teacher is the tiny CLIP preset's freshly initialised
parameters, exported (no training step to compile): its scores are arbitrary, which is all an
exact comparison with a direct reference computation needs. A crash in any stage, resumed,
gives the same files as the uninterrupted run; bad input fails before anything is written.
"""

import collections
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import SMALL_SCENES, tiny_overrides

import mlcd
from configs import common
from input_pipeline.datasets import synthetic_scenes
from input_pipeline.tokenizers import load_tokenizer
from mlcd import annotate, export, label_store, train_state
from mlcd.annotation import outputs, pipeline, store
from mlcd.annotation.matcher import normalize
from mlcd.entities import EntityTable, load_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD, L, THRESHOLD, N = 64, 3, 0.0, 256


@pytest.fixture(scope="module")
def teacher(scenes_builder, tmp_path_factory):
    """(export dir, workdir) of the CLIP tiny preset's step-0 parameters (export --random-init)."""
    workdir = str(tmp_path_factory.mktemp("teacher") / "clip")
    config = common.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    common.parse_overrides(config, tiny_overrides(str(scenes_builder.data_dir)))
    config.tokenizer = os.path.join(scenes_builder.data_dir, "tokenizer.json")
    config = train_state.resolve_model_config(config, load_tokenizer(config.tokenizer))
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    out = os.path.join(os.path.dirname(workdir), "export")
    return export.export(workdir, out, random_init=True), workdir


def argv(scenes_dir, teacher, out_dir, **extra):
    values = {
        "data.data_dir": scenes_dir,
        **{f"data.build.{k}": v for k, v in SMALL_SCENES.items()},
        "teacher.export": teacher[0],
        "teacher.workdir": "",
        "out_dir": out_dir,
        "verbose": False,
        "shard_size": SHARD,
        "filter.batch_size": 32,
        "filter.threshold": THRESHOLD,
        "labels.max_labels": L,
        **extra,
    }
    config = os.path.join(ROOT, "configs/annotate.py:tiny")
    return ["--config", config, *[f"--config.{k}={v}" for k, v in values.items()]]


def config_of(args):
    config = common.load_config(args[1])
    common.parse_overrides(config, args[2:])
    return config


@pytest.fixture(scope="module")
def reference(scenes_dir, teacher, tmp_path_factory):
    """An uninterrupted run through the CLI (filter.text = name_description); its directory."""
    out = str(tmp_path_factory.mktemp("ref") / "annotations")
    assert annotate.main(argv(scenes_dir, teacher, out)) == 0
    return out


@pytest.fixture(scope="module")
def split(scenes_builder):
    """The train split's ids, alt-texts, true entity ids and decoded images."""
    source = scenes_builder.as_data_source("train")
    records = [source[i] for i in range(len(source))]
    return {
        "ids": [r["id"].decode() for r in records],
        "alt_text": [r["alt_text"].decode() for r in records],
        "truth": [{int(e) for e in r["entity_ids"] if e >= 0} for r in records],
        "images": np.stack([r["image"] for r in records]),
    }


@pytest.fixture(scope="module")
def table(scenes_builder):
    return load_table(os.path.join(scenes_builder.data_dir, "entities.json"))


def naive_candidates(text, table, aliases=True):
    """Reference matcher: every phrase compared at every word, longest first, then skip it."""
    phrases = [(normalize(n).split(), e) for n, e in zip(table.names, table.ids.tolist())]
    if aliases:
        phrases += [
            (normalize(a).split(), e) for k, e in enumerate(table.ids) for a in table.aliases[k]
        ]
    words, out, i = normalize(text).split(), [], 0
    while i < len(words):
        hits = [(len(p), e) for p, e in phrases if words[i : i + len(p)] == p]
        if not hits:
            i += 1
            continue
        n = max(h[0] for h in hits)
        out += [e for e in sorted(e for m, e in hits if m == n) if e not in out]
        i += n
    return out


def stage_arrays(out_dir):
    """Per example: (candidates, stored scores or None), from the stage files."""
    rows = []
    for s in range(N // SHARD):
        with np.load(store.shard_path(out_dir, store.CANDIDATES_DIR, s)) as z:
            offsets, entities = z["offsets"], z["entities"]
        path = store.shard_path(out_dir, store.SCORES_DIR, s)
        scores = np.load(path)["scores"] if os.path.exists(path) else None
        for j in range(len(offsets) - 1):
            a, b = offsets[j], offsets[j + 1]
            rows.append((entities[a:b].tolist(), None if scores is None else scores[a:b]))
    return rows


def reference_selection(rows, threshold, per_image, min_images, width):
    """The selection of mlcd/annotation/selection.py as a plain loop: (labels, sims, vocab)."""
    kept = []
    for cands, scores in rows:
        if scores is None:
            pairs = [(c, np.nan) for c in cands]
        else:
            order = sorted(range(len(cands)), key=lambda k: -scores[k])  # stable on ties
            pairs = [(cands[k], scores[k]) for k in order if scores[k] >= threshold]
        kept.append(pairs[:per_image])
    counts = collections.Counter(c for pairs in kept for c, _ in pairs)
    vocab = sorted(c for c, n in counts.items() if n >= min_images)
    new = {c: j for j, c in enumerate(vocab)}
    labels = np.full((len(rows), width), -1, np.int32)
    sims = np.full((len(rows), width), np.nan, np.float32)
    for i, pairs in enumerate(kept):
        pairs = [(new[c], s) for c, s in pairs if c in new]
        for slot, (c, s) in enumerate(pairs):
            labels[i, slot], sims[i, slot] = c, s
    return labels, sims, vocab


def test_end_to_end_matches_a_direct_reference(reference, teacher, split, table):
    ann = store.load_annotations(reference)
    meta = ann.meta
    assert meta["complete"] is True and meta["num_examples"] == N and meta["max_labels"] == L
    assert (meta["dataset"], meta["split"], meta["text_key"]) == (
        "synthetic_scenes",
        "train",
        "alt_text",
    )
    assert meta["teacher"]["path"] == teacher[0] and meta["teacher"]["step"] == 0
    assert ann.labels.dtype == np.int32 and ann.labels.shape == (N, L)
    assert ann.similarities.dtype == np.float32 and ann.similarities.shape == (N, L)
    assert ann.ids.tolist() == split["ids"]
    np.testing.assert_array_equal(ann.id_hashes, label_store.id_hash(split["ids"]))
    assert all(isinstance(a, np.memmap) for a in (ann.ids, ann.labels, ann.id_hashes))

    # Candidates: the reference matcher on every alt-text (aliases included).
    rows = stage_arrays(reference)
    assert [r[0] for r in rows] == [naive_candidates(t, table) for t in split["alt_text"]]
    # Scores: the teacher's cosine of the image and "name: description".
    encoder = mlcd.load_encoder(teacher[0])
    image = encoder.embed_images(split["images"])["embedding"].astype(np.float64)
    text = encoder.embed_texts([table.text(e, True) for e in range(48)])["embedding"]
    for i, (cands, scores) in enumerate(rows):
        np.testing.assert_allclose(scores, image[i] @ text[cands].T.astype(np.float64), atol=1e-5)
    # Labels: the selection as a plain loop over the stored scores.
    labels, sims, vocab = reference_selection(rows, THRESHOLD, L, 1, L)
    np.testing.assert_array_equal(ann.labels, labels)
    np.testing.assert_array_equal(ann.similarities, sims)  # NaN padding compares equal
    # The filter keeps exactly the candidates at or above the threshold, best first, the best
    # l of them where more pass.
    over = 0
    for i, (cands, scores) in enumerate(rows):
        kept = [vocab[c] for c in ann.labels[i] if c >= 0]
        passing = sorted((-s, c) for c, s in zip(cands, scores) if s >= THRESHOLD)
        assert kept == [c for _, c in passing[:L]]
        assert np.all(np.diff(ann.similarities[i][ann.labels[i] >= 0]) <= 0)  # best first
        over += len(passing) > L
    assert over == meta["counts"]["examples_over_top_k"]
    dropped = sum(1 for _, scores in rows for s in scores if s < THRESHOLD)
    assert 0 < dropped < meta["counts"]["candidates"]  # the threshold cuts into the scores
    # The table of the labels: the vocabulary renumbered, each entry with its source id.
    out_table = load_table(ann.entities_path)
    assert out_table.entries() == table.subset(vocab).entries()
    assert [e["source_id"] for e in out_table.entries()] == vocab
    assert meta["num_entities"] == len(vocab) and meta["entities_digest"] == out_table.digest()
    assert meta["source_entities_digest"] == table.digest()
    # Quality against the dataset's entity_ids.
    pred = [{vocab[c] for c in row if c >= 0} for row in ann.labels]
    hits = sum(len(p & t) for p, t in zip(pred, split["truth"]))
    run = meta["quality"]["rows"]["this run"]
    assert run["precision"] == pytest.approx(hits / sum(map(len, pred)))
    assert run["recall"] == pytest.approx(hits / sum(map(len, split["truth"])))
    assert meta["quality"]["rows"]["threshold 0.0"] == run
    nofilter = meta["quality"]["rows"]["no filter"]
    cands = [set(r[0][:L]) for r in rows]  # the same selection without the teacher: mention order
    assert nofilter["precision"] == pytest.approx(
        sum(len(c & t) for c, t in zip(cands, split["truth"])) / sum(map(len, cands))
    )
    assert os.path.getsize(os.path.join(reference, store.PLOT_FILE)) > 10_000
    assert [f for _, _, fs in os.walk(reference) for f in fs if ".tmp-" in f] == []


def test_top_k_and_rare_entities_are_remapped(scenes_dir, teacher, tmp_path, table, split):
    """top_k = 1 keeps each image's best candidate (threshold -1: ranking only, the bare name
    as text); entities on fewer than 3 images leave the vocabulary, the rest is renumbered."""
    out = str(tmp_path / "ann")
    extra = {
        "filter.top_k": 1,
        "filter.threshold": -1.0,
        "filter.text": "name",
        "labels.min_images_per_entity": 3,
    }
    assert annotate.main(argv(scenes_dir, teacher, out, **extra)) == 0
    ann = store.load_annotations(out)
    rows = stage_arrays(out)
    labels, sims, vocab = reference_selection(rows, -1.0, 1, 3, L)
    np.testing.assert_array_equal(ann.labels, labels)
    np.testing.assert_array_equal(ann.similarities, sims)
    assert (ann.labels[:, 1:] == -1).all() and ann.meta["counts"]["examples_over_top_k"] > 0
    best = [max(zip(s, c))[1] if c else None for c, s in rows]
    counts = collections.Counter(b for b in best if b is not None)
    assert vocab == sorted(e for e, n in counts.items() if n >= 3)
    assert 0 < len(vocab) < len(counts)  # some entities were dropped as rare
    assert (
        ann.meta["num_entities"] == len(vocab) and ann.meta["counts"]["images_per_entity_min"] >= 3
    )
    assert [e["source_id"] for e in load_table(ann.entities_path).entries()] == vocab
    assert ann.meta["filter"] == {"enabled": True, "threshold": -1.0, "top_k": 1, "text": "name"}


def test_unfiltered_run_needs_no_teacher_and_shows_progress(
    scenes_dir, teacher, tmp_path, table, split, capsys
):
    out = str(tmp_path / "ann")
    extra = {
        "filter.enabled": False,
        "teacher.export": "",
        "verbose": True,
        "data.split": "train[:64]",
    }
    assert annotate.main(argv(scenes_dir, teacher, out, **extra)) == 0
    captured = capsys.readouterr()
    assert re.search(r"candidates: 100%.*64/64 .*text/s\]", captured.err)
    assert "teacher" not in captured.err and "precision" in captured.out
    ann = store.load_annotations(out)
    assert ann.meta["teacher"] is None and ann.meta["filter"]["threshold"] is None
    assert np.isnan(ann.similarities).all()
    assert not os.path.exists(os.path.join(out, store.TEXT_EMBEDDINGS_FILE))
    # Mention order, cut at l; every entity mentioned at least once is in the vocabulary.
    cands = [naive_candidates(t, table) for t in split["alt_text"][:64]]
    vocab = sorted({c for cs in cands for c in cs[:L]})
    expected = [[vocab.index(c) for c in cs[:L]] + [-1] * (L - len(cs[:L])) for cs in cands]
    np.testing.assert_array_equal(ann.labels, expected)


def test_teacher_progress_bars(scenes_dir, teacher, tmp_path, capsys):
    out = str(tmp_path / "ann")
    assert (
        annotate.main(argv(scenes_dir, teacher, out, verbose=True, **{"data.split": "train[:40]"}))
        == 0
    )
    err = capsys.readouterr().err
    for bar in ("candidates: 100%.*40/40", "entity texts: 100%", r"teacher: 100%.*img/s\]"):
        assert re.search(bar, err), bar


def wrap(monkeypatch, module, name, crash_at=None):
    """Counts calls of module.<name> (the list returned); the crash_at-th one raises."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_crash_in_every_stage_then_resume_equals_uninterrupted(
    reference, scenes_dir, teacher, tmp_path, monkeypatch
):
    out = str(tmp_path / "ann")
    config = config_of(argv(scenes_dir, teacher, out))

    def crash(module, name, n, counted=()):
        with monkeypatch.context() as m:
            counts = {c: wrap(m, mod, c) for mod, c in counted}
            wrap(m, module, name, crash_at=n)
            with pytest.raises(RuntimeError, match="simulated crash"):
                annotate.run(config)
        assert not os.path.exists(os.path.join(out, store.META_FILE))
        with pytest.raises(FileNotFoundError, match="is not a complete entity annotation"):
            store.load_annotations(out)
        return {c: len(v) for c, v in counts.items()}

    crash(pipeline, "write_candidates", 3)  # shards 0-1 written, 2 in progress
    assert sorted(os.listdir(os.path.join(out, store.CANDIDATES_DIR))) == [
        "shard_00000.npz",
        "shard_00001.npz",
    ]
    redone = crash(pipeline, "write_scores", 2, [(pipeline, "write_candidates")])
    assert redone == {"write_candidates": 2}
    assert os.listdir(os.path.join(out, store.SCORES_DIR)) == ["shard_00000.npz"]
    assert os.path.exists(os.path.join(out, store.TEXT_EMBEDDINGS_FILE))
    redone = crash(outputs, "plot", 1, [(pipeline, "write_scores"), (pipeline, "write_candidates")])
    assert redone == {"write_scores": 3, "write_candidates": 0}
    annotate.run(config)
    names = [*label_store.LABEL_FILES, store.ENTITIES_FILE, store.TEXT_EMBEDDINGS_FILE]
    names += [
        os.path.join(d, f"shard_{s:05d}.npz") for d in ("candidates", "scores") for s in range(4)
    ]
    for name in names:
        with (
            open(os.path.join(reference, name), "rb") as a,
            open(os.path.join(out, name), "rb") as b,
        ):
            assert a.read() == b.read(), name
    assert store.load_annotations(out).meta == store.load_annotations(reference).meta


def test_resume_refuses_a_changed_config_table_or_foreign_directory(
    reference, scenes_dir, teacher, tmp_path, table, monkeypatch
):
    out = shutil.copytree(reference, str(tmp_path / "ann"))
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    with pytest.raises(
        ValueError, match=r"config.filter.threshold=0.1 differs from 0.0 in .*annotate_config.json"
    ):
        annotate.run(config_of(argv(scenes_dir, teacher, out, **{"filter.threshold": 0.1})))
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
    # The entity table edited while a run was incomplete: its candidates are not continued.
    path = str(tmp_path / "entities.json")
    table.save(path)
    config = config_of(argv(scenes_dir, teacher, str(tmp_path / "b"), **{"entities.path": path}))
    with monkeypatch.context() as m:
        wrap(m, pipeline, "write_scores", crash_at=1)
        with pytest.raises(RuntimeError):
            annotate.run(config)
    EntityTable([{**e, "description": "?"} for e in table.entries()]).save(path)
    with pytest.raises(
        ValueError, match=r"config.entities.path: the entity table .* changed since"
    ):
        annotate.run(config)
    # A directory holding other outputs (here a clustering's) is never written into.
    other = tmp_path / "clusters"
    other.mkdir()
    (other / "cluster_config.json").write_text("{}")
    with pytest.raises(
        ValueError,
        match=r"clusters is not empty and has no annotate_config.json: refusing to write entity",
    ):
        annotate.run(config_of(argv(scenes_dir, teacher, str(other))))
    assert os.listdir(other) == ["cluster_config.json"]


def test_rerun_of_a_complete_run_does_nothing(reference, scenes_dir, teacher, capsys):
    before = os.path.getmtime(os.path.join(reference, store.META_FILE))
    assert annotate.main(argv(scenes_dir, teacher, reference)) == 0
    assert os.path.getmtime(os.path.join(reference, store.META_FILE)) == before
    assert "entities kept (C)" in capsys.readouterr().out


def test_label_join_checks_id_hashes(reference, scenes_builder):
    """The trainer's join (label_store.LabelTable over load_annotations) returns the rows of
    this split and refuses another split's examples."""
    ann = store.load_annotations(reference)
    joined = label_store.LabelTable(
        reference, ann.labels, ann.id_hashes, ann.meta["num_entities"], 2, top_l_key="top_l"
    )
    ids = [f"train_{i:08d}" for i in range(5)]
    np.testing.assert_array_equal(joined.lookup(np.arange(5), ids), ann.labels[:5, :2])
    test_ids = [f"test_{i:08d}" for i in range(5)]
    with pytest.raises(ValueError, match="labels file does not match this dataset/split"):
        joined.lookup(np.arange(5), test_ids)


def test_load_annotations_checks_the_files(reference, tmp_path):
    out = shutil.copytree(reference, str(tmp_path / "ann"))
    label_store.save_npy(os.path.join(out, label_store.LABELS_FILE), np.zeros((N, L), np.int64))
    with pytest.raises(ValueError, match=r"ann/labels\.npy: int64 \(256, 3\) does not match"):
        store.load_annotations(out)
    os.remove(os.path.join(out, store.ENTITIES_FILE))
    shutil.copy(os.path.join(reference, label_store.LABELS_FILE), out)
    with pytest.raises(
        FileNotFoundError, match=r"ann is not a complete entity annotation: entities"
    ):
        store.load_annotations(out)
    meta_path = os.path.join(out, store.META_FILE)
    with open(meta_path) as f:
        label_store.save_json(meta_path, {**json.load(f), "complete": False})
    with pytest.raises(ValueError, match=r"annotations\.json: complete is not true"):
        store.load_annotations(out)


def write_bad_table(path):
    entries = synthetic_scenes.entities()[:3]
    entries[1]["id"] = 0
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def image_only_workdir(teacher, path):
    """A run directory whose config.json has no text tower (as an MLCD run's)."""
    os.makedirs(path)
    with open(os.path.join(teacher[1], "config.json")) as f:
        config = json.load(f)
    config["model"]["text"] = None
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"teacher.export": ""}, r"config.teacher: set exactly one .* got neither"),
        ({"teacher.export": "/nonexistent/export"}, r"config.teacher.export=/nonexistent/export: "),
        (
            {"teacher.export": "", "teacher.workdir": "IMAGE_ONLY"},
            r"config.teacher.workdir=.*image_only has no text tower \(an image-only model\), but config.filter embeds entity texts",
        ),
        (
            {"data.text_key": "caption"},
            r"config.data.text_key: dataset 'synthetic_scenes' has no feature 'caption' \(features: \[.*'alt_text'",
        ),
        (
            {"data.ground_truth": "truth"},
            r"config.data.ground_truth: dataset 'synthetic_scenes' has no feature 'truth'",
        ),
        (
            {"entities.path": "BAD_TABLE"},
            r"config.entities.path: .*bad.json: entry 1 \(id 0\): duplicate id, also entry 0",
        ),
        (
            {"entities.path": "/nonexistent.json"},
            r"config.entities.path: entity table /nonexistent.json does not exist",
        ),
        (
            {"filter.text": "desc"},
            r"config.filter.text='desc': one of \('name', 'name_description'\)",
        ),
        ({"filter.threshold": 1.5}, r"config.filter.threshold=1.5 must be a cosine in \[-1, 1\]"),
        ({"filter.top_k": 0}, r"config.filter.top_k=0 must be a positive integer"),
        (
            {"labels.min_images_per_entity": -1},
            r"config.labels.min_images_per_entity=-1 must be an integer >= 0",
        ),
        (
            {"data.ground_truth": "", "report.thresholds": (0.1,)},
            r"config.report.thresholds needs config.data.ground_truth",
        ),
        ({"data.split": "bogus"}, r"config.data.split='bogus': Unknown split"),
    ],
)
def test_bad_input_fails_before_writing(extra, message, scenes_dir, teacher, tmp_path, capsys):
    values = dict(extra)
    if values.get("teacher.workdir") == "IMAGE_ONLY":
        values["teacher.workdir"] = image_only_workdir(teacher, str(tmp_path / "image_only"))
    if values.get("entities.path") == "BAD_TABLE":
        values["entities.path"] = write_bad_table(str(tmp_path / "bad.json"))
    out = str(tmp_path / "ann")
    assert annotate.main(argv(scenes_dir, teacher, out, **values)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(out)


# Digests of every 1.0.0 feature of three examples (sha256 over sorted key, dtype, bytes), taken
# from the builder before alt_text existed: the noise stream must leave them all unchanged.
OLD_FEATURES = {
    ("train", 0, 32): "8b6abae1d70fe2494a1690cdde247019b6a42fd03e1f41311f80c4084e7b4bfb",
    ("train", 7, 32): "522bfbc8e274d1bf8b622f0fb6eb78d81e7136062f3d137113dd03d3ffcb2c9e",
    ("test", 123, 64): "eb71fc3a122a8af9862a5ad84b6f9248e8673634d5d4a5927a46d7833fa4ddd4",
}


def test_alt_text_adds_noise_and_leaves_the_other_features_unchanged(table):
    for (split, index, size), digest in OLD_FEATURES.items():
        example = synthetic_scenes.generate_example(0, split, index, size)
        h = hashlib.sha256()
        for key in sorted(set(example) - {"alt_text", "segmentation"}):
            value = np.asarray(example[key])
            h.update(key.encode() + str(value.dtype).encode() + value.tobytes())
        assert h.hexdigest() == digest, (split, index)
    noisy = 0
    for index in range(600):
        ex = synthetic_scenes.generate_example(0, "train", index, 16)
        short, alt = ex["short_caption"], ex["alt_text"]
        truth = {int(e) for e in ex["entity_ids"] if e >= 0}
        extra = set(naive_candidates(alt, table)) - set(naive_candidates(short, table))
        if alt != short:
            noisy += 1
            assert short.rstrip(".") in alt and len(extra) == 1 and not extra & truth, alt
        assert set(naive_candidates(short, table)) <= truth
    assert 0.25 < noisy / 600 < 0.35


def test_presets_build():
    tiny = common.load_config(os.path.join(ROOT, "configs/annotate.py:tiny"))
    annotate.check_config(tiny)
    train_data = common.tiny_preset(common.base_config()).data
    assert tiny.data.data_dir == train_data.data_dir and tiny.data.split == "train"
    assert tiny.data.build.to_dict() == train_data.build.to_dict()
    assert tiny.teacher.workdir == "runs/clip_tiny" and tiny.teacher.export is None
    assert (tiny.data.text_key, tiny.data.ground_truth) == ("alt_text", "entity_ids")
    web = common.load_config(os.path.join(ROOT, "configs/annotate.py:web"))
    annotate.check_config(web)
    assert web.entities.path.endswith(".jsonl") and web.teacher.export and not web.data.ground_truth
