"""MetricWriter: metrics.jsonl records, truncation on resume, a fresh log for a run restarted
without a checkpoint, TensorBoard events (read back from the event files' records), only
process 0 writing; read_metrics (a torn last line dropped, a bad line elsewhere named);
plot_metrics' PNG. No jax compilation: every test takes well under a second."""

import json
import logging
import math
import os
import re
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from mlcd.metrics_writer import MetricWriter, plot_metrics, read_metrics, truncate_after

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(workdir, records, resume_step=None):
    writer = MetricWriter(str(workdir), resume_step=resume_step)
    for step, metrics in records:
        writer.write(step, metrics)
    writer.close()
    return writer.path


def _events(workdir) -> list[event_pb2.Event]:
    """Every Event of every event file under <workdir>/tensorboard, in file order (TFRecord:
    uint64 length, uint32 crc, payload, uint32 crc)."""
    tb_dir = os.path.join(workdir, "tensorboard")
    events = []
    for name in sorted(os.listdir(tb_dir)):
        assert name.startswith("events.out.tfevents."), name
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def _scalars(workdir) -> dict[tuple[str, int], float]:
    return {
        (v.tag, e.step): v.simple_value
        for e in _events(workdir)
        if e.HasField("summary")
        for v in e.summary.value
    }


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])  # width, height


def test_records_are_json_lines_with_the_step(tmp_path):
    path = _write(
        tmp_path,
        [
            (1, {"train/loss": np.float32(2.5), "train/lr": 1e-3}),
            (2, {"train/loss": jax.numpy.asarray(1.25), "eval/top1": np.int64(1)}),
        ],
    )
    assert path == os.path.join(str(tmp_path), "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "train/loss": 2.5, "train/lr": 1e-3},
        {"step": 2, "train/loss": 1.25, "eval/top1": 1.0},
    ]
    # Plain Python types on disk: int steps, float values (not "1" or numpy reprs).
    assert lines[1] == '{"step": 2, "train/loss": 1.25, "eval/top1": 1.0}'


def test_non_finite_values_are_logged_to_jsonl_but_not_tensorboard(tmp_path):
    path = _write(tmp_path, [(1, {"a": float("nan"), "b": 3.0}), (2, {"a": float("inf")})])
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert math.isnan(records[0]["a"]) and records[0]["b"] == 3.0
    assert records[1]["a"] == math.inf
    assert _scalars(str(tmp_path)) == {("b", 1): 3.0}


def test_tensorboard_events_hold_every_scalar(tmp_path):
    _write(tmp_path, [(s, {"train/loss": 1.0 / s, "train/lr": 0.5 * s}) for s in (1, 2, 5)])
    files = os.listdir(tmp_path / "tensorboard")
    assert len(files) == 1 and os.path.getsize(tmp_path / "tensorboard" / files[0]) > 0
    want = {(k, s): v for s in (1, 2, 5) for k, v in (("train/loss", 1.0 / s), ("train/lr", s / 2))}
    got = _scalars(str(tmp_path))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-7)  # simple_value is float32
    # A fresh writer purges nothing.
    assert not [e for e in _events(str(tmp_path)) if e.HasField("session_log")]


def test_resume_drops_records_after_the_resume_step(tmp_path):
    """A run killed after logging step 5 and resumed from its step-3 checkpoint: the records of
    steps 4 and 5 are dropped (they are logged again), everything up to step 3 is kept (several
    records of one step included), and the resumed run's records follow."""
    path = _write(
        tmp_path,
        [
            (1, {"train/loss": 1.0}),
            (2, {"train/loss": 0.9}),
            (3, {"train/loss": 0.8}),
            (3, {"eval/top1": 0.3}),
            (4, {"train/loss": 0.7}),
            (5, {"train/loss": 0.6}),
            (5, {"eval/top1": 0.4}),
        ],
    )
    writer = MetricWriter(str(tmp_path), resume_step=3)
    assert read_metrics(path) == [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "train/loss": 0.9},
        {"step": 3, "train/loss": 0.8},
        {"step": 3, "eval/top1": 0.3},
    ]
    writer.write(4, {"train/loss": 0.65})
    writer.close()
    assert [(r["step"], r.get("train/loss")) for r in read_metrics(path)] == [
        (1, 1.0),
        (2, 0.9),
        (3, 0.8),
        (3, None),
        (4, 0.65),
    ]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]  # no temp file left

    # TensorBoard: the resumed writer's file starts with a purge of every step > 3 (tensorboard
    # hides events with step >= purge_step from earlier files).
    purges = [e.step for e in _events(str(tmp_path)) if e.HasField("session_log")]
    assert purges == [4]


def test_resume_at_or_after_the_last_step_keeps_the_file_untouched(tmp_path):
    path = _write(tmp_path, [(1, {"a": 1.0}), (2, {"a": 2.0})])
    before = open(path, "rb").read()
    inode = os.stat(path).st_ino
    for step in (2, 10):
        MetricWriter(str(tmp_path), resume_step=step).close()
        assert open(path, "rb").read() == before
        assert os.stat(path).st_ino == inode  # not rewritten
    MetricWriter(str(tmp_path), resume_step=0).close()
    assert read_metrics(path) == []


def test_a_run_restarted_without_a_checkpoint_logs_each_step_once(tmp_path, caplog):
    """A run killed before its first checkpoint, restarted: the new run starts from step 0
    (resume_step=None) and removes what the killed one logged (records and event files, one
    warning), so the log is that of one clean run; other files in tensorboard/ stay."""
    records = [(s, {"train/loss": 1.0 / s, "train/lr": 0.1 * s}) for s in (1, 2, 3, 4)]
    clean = tmp_path / "clean"
    _write(clean, records)
    run = tmp_path / "run"
    _write(run, records[:2])  # the killed run (its process gone, its files flushed)
    (run / "tensorboard" / "notes.txt").write_text("not ours")

    with caplog.at_level(logging.INFO):
        path = _write(run, records)
    assert read_metrics(path) == read_metrics(str(clean / "metrics.jsonl"))
    assert (run / "tensorboard" / "notes.txt").read_text() == "not ours"
    os.remove(run / "tensorboard" / "notes.txt")
    assert len(os.listdir(run / "tensorboard")) == 1
    assert _scalars(str(run)) == _scalars(str(clean))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        f"{run}: removing the log of an earlier run that left no checkpoint (metrics.jsonl, "
        "tensorboard/events.out.tfevents."
    )

    # Nothing to remove: no warning.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _write(tmp_path / "new", records)
    assert caplog.records == []


def test_a_torn_last_line_is_dropped_and_the_run_resumes(tmp_path, caplog):
    """A crash mid-write leaves a last line without its newline: unparsable, it is dropped with
    a warning naming the file and the resumed writer's rewrite removes it; complete but
    unterminated, it is kept and terminated before the next record is appended."""
    path = _write(tmp_path, [(s, {"a": float(s)}) for s in (1, 2, 3)])
    with open(path, "a") as f:
        f.write('{"step": 4, "a": 4.')
    with caplog.at_level(logging.INFO):
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f'{path}: dropping its torn last line \'{{"step": 4, "a": 4.\' (a write cut short)'
    )

    writer = MetricWriter(str(tmp_path), resume_step=3)
    writer.write(4, {"a": 4.5})
    writer.close()
    with open(path) as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and [json.loads(line)["step"] for line in lines[:-1]] == [1, 2, 3, 4]

    with open(path, "a") as f:
        f.write('{"step": 5, "a": 5.0}')
    writer = MetricWriter(str(tmp_path), resume_step=5)
    writer.write(6, {"a": 6.0})
    writer.close()
    assert [(r["step"], r["a"]) for r in read_metrics(path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.5),
        (5, 5.0),
        (6, 6.0),
    ]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"step": 2, "a"', r"Expecting ':' delimiter: line 1 column 16 \(char 15\)"),
        ("[2, 2.0]", "not an object with a step"),
        ('{"a": 2.0}', "not an object with a step"),
    ],
)
def test_a_bad_line_names_the_file_and_line(tmp_path, bad, reason):
    """A bad line followed by others (or a complete last line) is no torn write: the file is
    damaged, and reading, truncating or resuming it says where."""
    path = _write(tmp_path, [(s, {"a": float(s)}) for s in (1, 2, 3)])
    with open(path) as f:
        lines = f.read().splitlines()
    for at, number in ((1, 2), (2, 3)):
        with open(path, "w") as f:
            f.write("\n".join([*lines[:at], bad, *lines[at + 1 :]]) + "\n")
        message = rf"^{re.escape(path)}:{number}: not a metrics record \({reason}\)$"
        with pytest.raises(ValueError, match=message):
            read_metrics(path)
        with pytest.raises(ValueError, match=message):
            truncate_after(path, 1)
        with pytest.raises(ValueError, match=message):
            MetricWriter(str(tmp_path), resume_step=1)


def test_truncate_after_without_a_file_creates_nothing(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    truncate_after(path, 3)
    assert not os.path.exists(path)
    MetricWriter(str(tmp_path), resume_step=3).close()
    assert not os.path.exists(path)


def test_only_process_zero_writes(tmp_path, monkeypatch):
    """Other hosts of a multi-host run neither truncate the shared log on resume nor write."""
    path = _write(tmp_path / "run", [(s, {"a": float(s)}) for s in (1, 2, 3)])
    before = open(path, "rb").read()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    other = tmp_path / "other"
    other.mkdir()
    for workdir, resume_step in ((tmp_path / "run", 1), (other, None)):
        writer = MetricWriter(str(workdir), resume_step=resume_step)
        writer.write(4, {"a": 4.0})
        writer.close()
    assert open(path, "rb").read() == before
    assert os.listdir(other) == []


def test_read_metrics_round_trip(tmp_path):
    records = [{"step": 1, "x": 0.1, "y": -2.0}, {"step": 1, "z": 3.0}, {"step": 7, "x": 1e-9}]
    path = _write(
        tmp_path, [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in records]
    )
    assert read_metrics(path) == records
    # Blank lines are skipped; a missing file reads as no records.
    with open(path, "a") as f:
        f.write("\n\n")
    assert read_metrics(path) == records
    assert read_metrics(str(tmp_path / "missing.jsonl")) == []


def test_plot_metrics_writes_one_panel_per_metric(tmp_path):
    records = [
        (s, {"train/loss": 1.0 / s, "train/lr": 0.1, "a": s, "b": -s, "c": float(s % 3)})
        for s in range(1, 31)
    ]
    records.append((30, {"all_nan": float("nan"), "eval/top1": 0.5}))
    path = _write(tmp_path, records)
    out = str(tmp_path / "curves.png")
    assert plot_metrics(path, out) == out
    # 6 finite metrics (all_nan has no point): 4 columns x 2 rows of 4 x 3 inch panels, 100 dpi.
    assert _png_size(out) == (1600, 600)
    assert os.path.getsize(out) > 10_000
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "metrics.jsonl", "tensorboard"]

    # Overwrites an existing plot; an empty log still gives a (blank) one-panel figure.
    empty = str(tmp_path / "empty.png")
    assert plot_metrics(str(tmp_path / "missing.jsonl"), empty) == empty
    assert _png_size(empty) == (400, 300)
    plot_metrics(str(tmp_path / "missing.jsonl"), out)
    assert _png_size(out) == (400, 300)
