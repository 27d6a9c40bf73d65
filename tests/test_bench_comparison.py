"""bench/comparison.py, the harness of the method-vs-CLIP studies: docs sections, final metrics,
the table; and the two studies' command lines (--help only: no training)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
_spec = importlib.util.spec_from_file_location(
    "bench_comparison", os.path.join(BENCH, "comparison.py")
)
comparison = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comparison)

DOC = """# Evaluation

Intro.

<!-- begin: study -->
old table
<!-- end: study -->

After the section.
"""
PNG = b"\x89PNG\r\n\x1a\nnot really an image"


@pytest.fixture
def docs(tmp_path):
    doc = tmp_path / "docs" / "evaluation.md"
    doc.parent.mkdir()
    doc.write_text(DOC)
    png = tmp_path / "chart.png"
    png.write_bytes(PNG)
    return doc, png


def test_write_docs_section_replaces_only_between_markers(docs):
    doc, png = docs
    comparison.write_docs_section(str(doc), "study", "| new | table |\n\nBudget.\n", str(png))
    text = doc.read_text()
    assert "old table" not in text
    before, after = DOC.split("<!-- begin: study -->")[0], DOC.split("<!-- end: study -->")[1]
    assert text == (
        before
        + "<!-- begin: study -->\n![study](study.png)\n\n| new | table |\n\nBudget.\n"
        + "<!-- end: study -->"
        + after
    )
    # a second write replaces the first, the rest stays as it was
    comparison.write_docs_section(str(doc), "study", "v2", str(png), alt="Study")
    text = doc.read_text()
    assert text.startswith(before) and text.endswith(after)
    assert "| new | table |" not in text and "![Study](study.png)\n\nv2\n" in text


def test_write_docs_section_appends_markers_when_absent(docs):
    doc, png = docs
    comparison.write_docs_section(str(doc), "other", "| t |", str(png))
    text = doc.read_text()
    assert text.startswith(DOC.rstrip("\n") + "\n\n<!-- begin: other -->\n")
    assert text.endswith("![other](other.png)\n\n| t |\n<!-- end: other -->\n")
    assert "old table" in text  # the other section is untouched
    comparison.write_docs_section(str(doc), "other", "| t2 |", str(png))
    assert doc.read_text().count("<!-- begin: other -->") == 1


def test_write_docs_section_copies_the_png(docs):
    doc, png = docs
    (doc.parent / "study.png").write_bytes(b"old")
    comparison.write_docs_section(str(doc), "study", "x", str(png))
    assert (doc.parent / "study.png").read_bytes() == PNG
    # the png already in place (the doc's own) is left as it is
    comparison.write_docs_section(str(doc), "study", "x", str(doc.parent / "study.png"))
    assert (doc.parent / "study.png").read_bytes() == PNG


def test_write_docs_section_is_atomic(docs, monkeypatch):
    doc, png = docs
    listing = sorted(os.listdir(doc.parent))

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        comparison.write_docs_section(str(doc), "study", "new", str(png))
    assert doc.read_text() == DOC
    assert sorted(os.listdir(doc.parent)) == listing  # no temp file left


def test_write_docs_section_fails_on_broken_markers_without_writing(docs):
    doc, png = docs
    doc.write_text(DOC + "<!-- begin: study -->\n")
    with pytest.raises(ValueError, match="expected one"):
        comparison.write_docs_section(str(doc), "study", "new", str(png))
    assert doc.read_text() == DOC + "<!-- begin: study -->\n"
    assert not (doc.parent / "study.png").exists()


def _run_dir(tmp_path, rows, total_steps=100, **config):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = {"total_steps": total_steps, "batch_size": 128, "seed": 0, **config}
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return str(workdir)


def test_final_metrics_merges_the_last_step(tmp_path):
    workdir = _run_dir(
        tmp_path,
        [
            {"step": 50, "train/loss": 3.0, "linear_probe/count/top1": 0.1},
            {"step": 100, "train/loss": 2.0},
            {"step": 100, "linear_probe/count/top1": 0.7, "zeroshot/shape/top1": 0.3},
        ],
    )
    assert comparison.final_metrics(workdir) == {
        "step": 100,
        "train/loss": 2.0,
        "linear_probe/count/top1": 0.7,
        "zeroshot/shape/top1": 0.3,
    }


def test_final_metrics_of_an_unfinished_run_is_none(tmp_path):
    # stopped before the last step
    workdir = _run_dir(tmp_path, [{"step": 50, "train/loss": 3.0, "linear_probe/a/top1": 0.1}])
    assert comparison.final_metrics(workdir) is None
    # at the last step, but killed before the final evaluation
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 100, "train/loss": 2.0}) + "\n")
    assert comparison.final_metrics(workdir) is None
    # never started
    assert comparison.final_metrics(str(tmp_path / "missing")) is None


def test_train_seconds_and_budget(tmp_path):
    workdir = _run_dir(tmp_path, [], total_steps=1000)
    assert comparison.train_seconds(workdir) is None
    assert comparison.times_line({"a": workdir}) == "Train wall time: `a` n/a."
    comparison.atomic_write(os.path.join(workdir, comparison.TIME_FILE), b'{"train_seconds": 90}')
    assert comparison.train_seconds(workdir) == 90.0
    assert comparison.times_line({"a": workdir}) == "Train wall time: `a` 1.5 min."
    assert comparison.budget_line({"a": workdir, "b": workdir}) == (
        "Budget of every run: 1000 steps x 128 images, seed 0."
    )


def test_train_records_its_time_and_skips_a_finished_run(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, log):  # stands for python -m mlcd.train: leaves a finished run
        calls.append((cmd, log))
        workdir = cmd[cmd.index("--workdir") + 1]
        os.makedirs(workdir)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"total_steps": 4, "batch_size": 8, "seed": 1}, f)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 4, "linear_probe/count/top1": 0.5}) + "\n")
        return 12.0

    monkeypatch.setattr(comparison, "run", fake_run)
    workdir = str(tmp_path / "clip")
    overrides = {"data.text_keys": "('short_caption',)", **comparison.run_overrides(4, 8, 1)}
    metrics = comparison.train("configs/clip.py:tiny", overrides, workdir, "/data")
    assert metrics == {"step": 4, "linear_probe/count/top1": 0.5}
    [(cmd, log)] = calls
    assert cmd[1:5] == ["-m", "mlcd.train", "--config", "configs/clip.py:tiny"]
    assert cmd[7:] == [
        "--config.data.data_dir=/data",
        "--config.data.text_keys=('short_caption',)",
        "--config.total_steps=4",
        "--config.batch_size=8",
        "--config.seed=1",
        "--config.eval_every=0",
        "--config.ckpt_every=1",
    ]
    assert log == workdir + ".log"
    assert comparison.train_seconds(workdir) == 12.0
    # finished: not trained again, its time still reported
    assert comparison.train("configs/clip.py:tiny", overrides, workdir, "/data") == metrics
    assert len(calls) == 1 and comparison.train_seconds(workdir) == 12.0
    assert comparison.budget_line({"clip": workdir}) == (
        "Budget of every run: 4 steps x 8 images, seed 1."
    )


def test_table_bolds_the_best_and_prints_na():
    results = {
        "clip": {"m/a": 0.5, "m/b": 0.25},
        "method": {"m/a": 0.75},
        "other": {"m/a": 0.75, "m/b": 0.125},
    }
    text = comparison.table(results, [("m/a", "metric a"), ("m/b", "metric b"), ("m/c", "c")])
    assert text.split("\n") == [
        "| metric | clip | method | other |",
        "|---|---:|---:|---:|",
        "| metric a | 0.500 | **0.750** | **0.750** |",
        "| metric b | **0.250** | n/a | 0.125 |",
        "| c | n/a | n/a | n/a |",
    ]


def test_run_overrides():
    assert comparison.run_overrides(10) == {
        "total_steps": "10",
        "eval_every": "0",
        "ckpt_every": "2",
    }
    assert comparison.run_overrides(3, batch=128, seed=1) == {
        "total_steps": "3",
        "batch_size": "128",
        "seed": "1",
        "eval_every": "0",
        "ckpt_every": "1",
    }


@pytest.mark.parametrize("script", ["dreamlip_vs_clip.py", "mofi_vs_clip.py"])
def test_study_help_runs(script):
    result = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--docs" in result.stdout and "--steps" in result.stdout
