"""python -m input_pipeline.convert: WebDataset tars, parquet / CSV / TSV / JSONL tables and a
tfds dataset become a prepared tfds dataset the trainer reads; bad examples are skipped and
counted, bad input is named, a crashed conversion resumes without rewriting finished shards,
and the result does not depend on the number of workers."""

import io
import json
import os
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from configs import common
from input_pipeline import tokenizers
from input_pipeline.convert import __main__ as cli
from input_pipeline.convert import run, shards, sources
from input_pipeline.datasets import get_builder
from mlcd import train
from mlcd.metrics_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("red", "blue", "green", "cat", "dog", "car", "tree", "house", "on", "the", "grass", "road")


def _image(w, h, fmt, seed, mode="RGB") -> bytes:
    """A small noisy image (noise: JPEG bytes differ from a re-encode)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, fmt)
    return out.getvalue()


def _caption(seed) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_web_tars(root) -> dict:
    """4 img2dataset-style tars; returns {key: (image bytes, caption)} of the good examples
    in tar order. Bad ones: a corrupt and a truncated JPEG, an image without caption, a
    caption without image, and key '0000' again in the third tar."""
    good, seed = {}, 0
    fmts = ("JPEG", "PNG", "WEBP")
    for t, n in enumerate((8, 8, 6, 4)):
        with tarfile.open(os.path.join(root, f"{t:05d}.tar"), "w") as tar:
            for k in range(n):
                key, seed = f"{t}{k:03d}", seed + 1
                fmt = fmts[k % 3]
                data = _image(24 + 4 * k, 20 + 3 * t, fmt, seed)
                caption = _caption(seed)
                _add(tar, f"{key}.{fmt.lower().replace('jpeg', 'jpg')}", data)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                good[key] = (data, caption)
            if t == 0:
                _add(tar, "bad0.jpg", b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)
                _add(tar, "bad0.txt", b"corrupt")
                _add(tar, "trunc0.jpg", _image(64, 64, "JPEG", 99)[:300])
                _add(tar, "trunc0.txt", b"truncated")
            if t == 1:
                _add(tar, "nocap.jpg", _image(30, 30, "JPEG", 98))
                _add(tar, "noimg.txt", b"a caption without its image")
                _add(tar, "noimg.json", b'{"key": "noimg"}')
                rgba = _image(28, 28, "PNG", 97, mode="RGBA")
                _add(tar, "rgba.png", rgba)
                _add(tar, "rgba.txt", b"a transparent picture")
                good["rgba"] = (rgba, "a transparent picture")
            if t == 2:
                _add(tar, "0000.jpg", _image(30, 30, "JPEG", 96))
                _add(tar, "0000.txt", b"the same key again")
    return good


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """(tar directory, good examples, data_dir of their conversion with keep_first)."""
    root = str(tmp_path_factory.mktemp("web"))
    good = _write_web_tars(root)
    out = os.path.join(root, "out")
    run.convert(
        _config(
            name="web",
            out_dir=out,
            sources=f"{root}/{{00000..00003}}.tar",
            on_duplicate="keep_first",
        )
    )
    return root, good, out


def _config(**values):
    """configs/convert.py with `values` ({dotted key: value}) set as --config overrides."""
    config = common.load_config(os.path.join(ROOT, "configs/convert.py"))
    values = {"num_workers": 1, "verbose": False, **values}
    common.parse_overrides(config, [f"--config.{k}={v}" for k, v in values.items()])
    return config


def _read(data_dir, name, split="train") -> list[dict]:
    builder = get_builder(name, data_dir)
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return [source[i] for i in range(len(source))]


def _summary(data_dir, name, split="train") -> dict:
    with open(os.path.join(data_dir, name, "1.0.0", "convert", split, "summary.json")) as f:
        return json.load(f)


def test_expand_braces():
    assert sources.expand_braces("d/{0008..0010}.tar") == ["d/0008.tar", "d/0009.tar", "d/0010.tar"]
    assert sources.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert sources.expand_braces("x{y}{3..1}") == ["x{y}3", "x{y}2", "x{y}1"]


def test_webdataset_tars_keep_bytes_and_count_skips(web, tmp_path):
    root, good, out = web
    pattern = f"{root}/{{00000..00003}}.tar"
    with pytest.raises(ValueError, match=r"duplicate id '0000': .*00000.tar example 0 .*00002.tar"):
        run.convert(_config(name="dup", out_dir=str(tmp_path), sources=pattern))
    version_dir = os.path.join(tmp_path, "dup", "1.0.0")
    assert not os.path.exists(os.path.join(version_dir, "features.json"))  # not published
    layout = shards.Layout(version_dir, "dup", "train", 4)
    # A file written again is a new inode (written under another name, renamed into place).
    inodes = [os.stat(layout.shard_path(i)).st_ino for i in range(4)]

    # The rerun keeps the shards (only the one with the repeat is rewritten) and publishes.
    summary = run.convert(
        _config(name="dup", out_dir=str(tmp_path), sources=pattern, on_duplicate="keep_first")
    )
    after = [os.stat(layout.shard_path(i)).st_ino for i in range(4)]
    assert [a == b for a, b in zip(inodes, after)] == [True, True, False, True]
    assert summary == _summary(out, "web") | {"dataset": "dup", "data_dir": str(tmp_path)}
    assert summary["num_examples"] == len(good) == 27
    assert summary["skipped"] == {
        "duplicate_id": 1,
        "no_caption": 1,
        "no_image": 1,
        "undecodable_image": 2,
    }
    assert [e["id"] for e in summary["skipped_examples"]["undecodable_image"]] == ["bad0", "trunc0"]
    assert summary["images"] == {"converted_to_rgb": 1, "original_bytes": 26}

    examples = _read(out, "web")
    assert [e["id"].decode() for e in examples] == list(good)  # tar order, first '0000' kept
    for e in examples:
        data, caption = good[e["id"].decode()]
        assert e["caption"].decode() == caption
        if e["id"] == b"rgba":  # converted to RGB as the pipeline would decode it
            want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(e["image"]))), want)
        else:
            assert e["image"] == data  # the original bytes
    # tfds's own decoding (no SkipDecoding) works too: every stored image is RGB.
    decoded = get_builder("web", out).as_data_source("train")[0]["image"]
    assert decoded.dtype == np.uint8 and decoded.shape == (20, 24, 3)


def _shard_records(data_dir, name, split="train") -> list[list[bytes]]:
    builder = get_builder(name, data_dir)
    out = []
    for i in range(builder.info.splits[split].num_shards):
        layout = shards.Layout(
            os.fspath(builder.data_dir), name, split, builder.info.splits[split].num_shards
        )
        reader = array_record_module.ArrayRecordReader(layout.shard_path(i))
        out.append(reader.read_all())
        reader.close()
    return out


def test_parallel_equals_serial(web, tmp_path):
    root, _, out = web
    config = _config(
        name="web",
        out_dir=str(tmp_path),
        sources=f"{root}/{{00000..00003}}.tar",
        on_duplicate="keep_first",
        num_workers=2,
    )
    summary = run.convert(config)
    assert summary == _summary(out, "web") | {"data_dir": str(tmp_path)}
    assert _shard_records(str(tmp_path), "web") == _shard_records(out, "web")


def test_crash_resumes_without_rewriting_finished_shards(web, tmp_path, monkeypatch):
    root, _, out = web
    config = _config(
        name="web",
        out_dir=str(tmp_path),
        sources=f"{root}/{{00000..00003}}.tar",
        on_duplicate="keep_first",
    )
    real = shards.convert_shard
    calls = []

    def crash_on_shard_2(job):
        calls.append(job.index)
        if job.index == 2 and calls.count(2) == 1:
            raise OSError("simulated crash")
        return real(job)

    monkeypatch.setattr(shards, "convert_shard", crash_on_shard_2)
    with pytest.raises(OSError, match="simulated crash"):
        run.convert(config)
    layout = shards.Layout(os.path.join(tmp_path, "web", "1.0.0"), "web", "train", 4)
    assert [shards.read_marker(layout, i) is not None for i in range(4)] == [
        True,
        True,
        False,
        False,
    ]
    done = [os.stat(layout.shard_path(i)) for i in range(2)]
    # What a kill leaves: a half-written temporary file, a renamed shard without its marker.
    with open(
        os.path.join(layout.tmp_dir, os.path.basename(layout.shard_path(2)) + ".x"), "wb"
    ) as f:
        f.write(b"half")
    with open(layout.shard_path(3), "wb") as f:
        f.write(b"no marker")

    run.convert(config)
    assert calls == [0, 1, 2, 2, 3]  # the finished shards were not converted again
    again = [os.stat(layout.shard_path(i)) for i in range(2)]
    assert [(s.st_ino, s.st_mtime_ns) for s in again] == [(s.st_ino, s.st_mtime_ns) for s in done]
    assert not os.listdir(layout.tmp_dir)
    assert _shard_records(str(tmp_path), "web") == _shard_records(out, "web")


def _write_tables(root):
    """A parquet of image bytes (img2dataset's columns), a CSV and a TSV of image paths
    (open_clip's columns); returns {id: (image bytes, caption)} of what each should keep."""
    os.makedirs(os.path.join(root, "images"))
    parquet_rows, kept = [], {"parquet": {}, "csv": {}, "tsv": {}}
    for i in range(7):
        data, caption = _image(30 + i, 26, "JPEG", 200 + i), _caption(200 + i)
        parquet_rows.append({"key": f"p{i}", "jpg": data, "caption": caption, "url": "http://x"})
        kept["parquet"][f"p{i}"] = (data, caption)
    table = pa.Table.from_pylist(parquet_rows)
    pq.write_table(table, os.path.join(root, "web.parquet"), row_group_size=3)

    def path_table(name, sep, sizes, captions):
        lines = [sep.join(("filepath", "title"))]
        for i, ((w, h), caption) in enumerate(zip(sizes, captions)):
            rel = f"images/{name}{i}.png"
            if (w, h) != (0, 0):  # (0, 0): a row whose file is missing
                data = _image(w, h, "PNG", 300 + i)
                with open(os.path.join(root, rel), "wb") as f:
                    f.write(data)
                kept[name][f"{name}.{name}#{i}"] = (data, caption)
            lines.append(sep.join((rel, caption)))
        with open(os.path.join(root, f"{name}.{name}"), "w") as f:
            f.write("\n".join(lines) + "\n")

    path_table("csv", ",", [(20, 20), (0, 0), (24, 20), (22, 30)], ["one two", "gone", "", "a b c"])
    del kept["csv"]["csv.csv#2"]  # empty title
    # TSV, converted with filters: min side 20, aspect <= 2, 2-5 words.
    path_table(
        "tsv",
        "\t",
        [(30, 24), (10, 40), (50, 20), (30, 30), (30, 30)],
        [
            "tab separated, caption",
            "too narrow",
            "too wide here",
            "short",
            "one two three four five six",
        ],
    )
    for i in (1, 2, 3, 4):
        del kept["tsv"][f"tsv.tsv#{i}"]
    return kept


def test_tables_and_a_second_split(tmp_path):
    root = str(tmp_path)
    kept = _write_tables(root)
    common_values = {"name": "tables", "out_dir": f"{root}/out", "rows_per_shard": 4}
    summary = run.convert(_config(**common_values, sources=f"{root}/web.parquet::{root}/*.csv"))
    assert summary["num_shards"] == 2 + 1  # row groups (3, 3, 1) -> two units of >= 4 rows; CSV
    assert summary["skipped"] == {"image_file_not_found": 1, "no_caption": 1}
    assert summary["skipped_examples"]["image_file_not_found"][0]["detail"].endswith(
        "images/csv1.png"
    )
    filters = {
        "filters.min_shorter_side": 20,
        "filters.max_aspect_ratio": 2.0,
        "filters.caption_min_words": 2,
        "filters.caption_max_words": 5,
    }
    summary = run.convert(
        _config(**common_values, **filters, split="validation", sources=f"{root}/tsv.tsv")
    )
    assert summary["skipped"] == {
        "aspect_ratio_too_large": 1,
        "caption_too_long": 1,
        "caption_too_short": 1,
        "image_too_small": 1,
    }
    # No registration: tfds opens the directory from its metadata files.
    builder = tfds.builder("tables", data_dir=f"{root}/out")
    assert {s: builder.info.splits[s].num_examples for s in ("train", "validation")} == {
        "train": 9,
        "validation": 1,
    }
    for split, want in (("train", {**kept["parquet"], **kept["csv"]}), ("validation", kept["tsv"])):
        got = {
            e["id"].decode(): (e["image"], e["caption"].decode())
            for e in _read(f"{root}/out", "tables", split)
        }
        assert got == want


def test_jsonl_extra_texts_and_entities(tmp_path):
    root = str(tmp_path)
    rows, images = [], {}
    for i in range(3):
        images[i] = _image(20, 20, "WEBP", 400 + i)
        with open(os.path.join(root, f"{i}.webp"), "wb") as f:
            f.write(images[i])
        rows.append(
            {
                "id": f"j{i}",
                "image": f"{i}.webp",
                "text": f"short {i}",
                **({"long": f"A long caption. Sentence {i}."} if i != 1 else {}),
                "tags": ["cat", "tree"][:i],
            }
        )
    with open(os.path.join(root, "meta.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = run.convert(
        _config(
            name="dream",
            out_dir=f"{root}/out",
            sources=f"{root}/meta.jsonl",
            **{"fields.texts": "(('long', 'long_caption'),)", "fields.entities": "tags"},
        )
    )
    assert summary["empty_texts"] == {"long_caption": 1}
    builder = get_builder("dream", f"{root}/out")
    assert sorted(builder.info.features) == ["caption", "entities", "id", "image", "long_caption"]
    got = _read(f"{root}/out", "dream")
    assert [e["id"] for e in got] == [b"j0", b"j1", b"j2"]
    assert [e["long_caption"] for e in got] == [
        b"A long caption. Sentence 0.",
        b"",
        b"A long caption. Sentence 2.",
    ]
    assert [list(e["entities"]) for e in got] == [[], [b"cat"], [b"cat", b"tree"]]
    assert [e["image"] for e in got] == list(images.values())


def test_bad_input_is_named(tmp_path, capsys):
    root = str(tmp_path)
    with open(os.path.join(root, "t.csv"), "w") as f:
        f.write("filepath,title,url\na.jpg,a cat,http://example.com/a.jpg\n")
    with open(os.path.join(root, "u.csv"), "w") as f:
        f.write("url,caption\nhttp://example.com/a.jpg,a cat\n")
    base = [
        "--config",
        os.path.join(ROOT, "configs/convert.py"),
        "--config.name=bad",
        f"--config.out_dir={root}/out",
        "--config.num_workers=1",
        "--config.verbose=False",
    ]
    cases = {
        f"{root}/t.csv --config.fields.caption=text": r"config.fields.caption='text': .*t.csv has no such column \(columns: filepath, title, url\)",
        f"{root}/u.csv": r"config.fields.image: none of the default columns .* \(columns: url, caption\)",
        f"{root}/u.csv --config.fields.image=url": "is a URL, http://example.com/a.jpg; URLs are not fetched: download",
        f"{root}/{{0..3}}.tar": f"config.sources: {root}/0.tar does not exist",
        f"{root}/*.parquet": r"pattern '.*\*.parquet' matches no file",
        f"{root}/t.csv --config.on_duplicat=keep_first": "unknown config key. Did you mean: on_duplicate",
    }
    for args, message in cases.items():
        source, *more = args.split(" ")
        assert cli.main([*base, f"--config.sources={source}", *more]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert re.search(message, err), (message, err)


def test_tfds_source_reencoded_with_a_size_cap(web, tmp_path):
    _, good, out = web
    summary = run.convert(
        _config(
            name="web_small",
            out_dir=str(tmp_path),
            **{
                "tfds.name": "web",
                "tfds.data_dir": out,
                "image.max_shorter_side": 16,
                "rows_per_shard": 10,
            },
        )
    )
    assert summary["num_shards"] == 3 and summary["images"] == {"resized": 27}
    examples = _read(str(tmp_path), "web_small")
    assert [e["id"].decode() for e in examples] == list(good)
    for e in examples:
        image = Image.open(io.BytesIO(e["image"]))
        assert image.format == "JPEG" and min(image.size) == 16


def test_trains_two_steps_on_converted_data(web, tmp_path):
    # The CLI path users take: configs/clip.py:web_tiny with command-line overrides only, a
    # validation split converted next to train, and retrieval on it (images of mixed sizes).
    root, good, _ = web
    out = str(tmp_path / "data")
    for split, tars in (("train", "{00000..00001}"), ("validation", "00003")):
        run.convert(_config(name="web", out_dir=out, split=split, sources=f"{root}/{tars}.tar"))
    tokenizer = tokenizers.train_bpe_tokenizer([c for _, c in good.values()], vocab_size=300)
    path = os.path.join(tmp_path, "tokenizer.json")
    with open(path, "w") as f:
        f.write(tokenizer.to_json())
    config = common.load_config(os.path.join(ROOT, "configs/clip.py:web_tiny"))
    values = {
        "data.name": "web",
        "data.data_dir": out,
        "tokenizer": path,
        "evals.retrieval.every": 0,  # after the last step
        # Seconds, not minutes (as conftest.tiny_overrides does for synthetic_scenes runs).
        "pp.image_size": 32,
        "pp.context_length": 48,
        "batch_size": 16,
        "total_steps": 2,
        "log_every": 1,
        "ckpt_every": 2,
    }
    overrides = [f"--config.{k}={v}" for k, v in values.items()]
    common.parse_overrides(config, overrides)
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(config, workdir)
    losses = [
        r["train/loss"]
        for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    ]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert 0 <= final["retrieval/validation/i2t_r1"] <= 1  # 4 images of different sizes


def test_truncated_tar_keeps_the_examples_before_the_damage(web, tmp_path):
    root, good, _ = web
    with open(os.path.join(root, "00003.tar"), "rb") as f:
        data = f.read()
    with open(os.path.join(tmp_path, "cut.tar"), "wb") as f:
        f.write(data[: len(data) // 2])
    summary = run.convert(_config(name="cut", out_dir=str(tmp_path), sources=f"{tmp_path}/cut.tar"))
    kept = [e["id"].decode() for e in _read(str(tmp_path), "cut")]
    assert kept == [k for k in good if k.startswith("3")][: len(kept)] and kept
    assert summary["skipped"] == {"unreadable_source": 1}
    assert summary["num_read"] == len(kept) + 1
