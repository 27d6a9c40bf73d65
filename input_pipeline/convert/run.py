"""One split's conversion, start to finish: check the config, plan the units, convert the
shards that are not done (in worker processes), resolve repeated ids, write the split's record,
the tfds metadata and summary.json.

A rerun of the same command resumes: shards with a marker are not touched, the others are
written again from the start. A rerun with a different config or different input files is
refused (naming what changed), except for RUNTIME_KEYS, which do not change the shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import ml_collections
import tensorflow_datasets as tfds
import tqdm

from configs import common as config_lib
from input_pipeline.convert import dedup, examples, fields, metadata, shards, sources
from input_pipeline.convert.readers import Skipped
from input_pipeline.datasets import DATASETS

RUNTIME_KEYS = ("num_workers", "verbose", "on_duplicate")
ON_DUPLICATE = ("error", "keep_first")
DUPLICATE_ID = "duplicate_id"  # the skip reason of a repeat dropped with keep_first
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SPLIT = re.compile(r"[A-Za-z0-9_]+")
_PARENT_POLL_S = 0.5


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the config key of the first invalid value (no file is read)."""
    if not _NAME.fullmatch(config.name):
        raise ValueError(
            f"config.name={config.name!r}: the dataset name must be lower-case letters, digits "
            "and '_', starting with a letter"
        )
    try:
        tfds.builder_cls(config.name)
        registered = True
    except tfds.core.registered.DatasetNotFoundError:
        registered = config.name in DATASETS
    if registered:
        raise ValueError(
            f"config.name={config.name!r} is the name of a dataset with builder code (tfds or "
            "this project's), which would be opened instead of the converted files: choose another"
        )
    if not tfds.core.Version.is_valid(config.version):
        raise ValueError(f"config.version={config.version!r}: expected MAJOR.MINOR.PATCH")
    if not _SPLIT.fullmatch(config.split):
        raise ValueError(f"config.split={config.split!r}: letters, digits and '_' only")
    if not config.out_dir:
        raise ValueError("config.out_dir is empty: name the data_dir to write the dataset into")
    if bool(config.sources) == bool(config.tfds.name):
        raise ValueError("set exactly one of config.sources (files) and config.tfds.name")
    t = config.tfds
    if t.name and not t.data_dir:
        raise ValueError("config.tfds.data_dir is empty: where is the prepared tfds dataset?")
    if t.name and os.path.realpath(t.data_dir) == os.path.realpath(config.out_dir):
        if t.name.split("/")[0].split(":")[0] == config.name:
            raise ValueError(
                f"config.name={config.name!r}: the output would overwrite the tfds source "
                f"{t.name!r} in {t.data_dir}: choose another name or out_dir"
            )
    if config.on_duplicate not in ON_DUPLICATE:
        raise ValueError(f"config.on_duplicate={config.on_duplicate!r}: one of {ON_DUPLICATE}")
    if len(config.csv_separator) > 1:
        raise ValueError(f"config.csv_separator={config.csv_separator!r}: one character, or ''")
    numbers = {
        "rows_per_shard": (config.rows_per_shard, 1),
        "num_workers": (config.num_workers, 0),
        "image.max_shorter_side": (config.image.max_shorter_side, 0),
        **{f"filters.{k}": (v, 0) for k, v in config.filters.items()},
    }
    for key, (value, low) in numbers.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
            raise ValueError(f"config.{key}={value!r} must be a number >= {low}")
    if not 1 <= config.image.jpeg_quality <= 100:
        raise ValueError(f"config.image.jpeg_quality={config.image.jpeg_quality!r}: 1 to 100")


def version_dir(config: ml_collections.ConfigDict) -> str:
    """OUT_DIR/NAME/VERSION: where tfds.builder(NAME, data_dir=OUT_DIR) looks."""
    return os.path.join(os.path.abspath(config.out_dir), config.name, config.version)


def convert(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Converts config.split (see the package docstring) and returns its summary.

    With more than one worker the workers are spawned processes, which import the calling
    script's main module: a script calling this needs the `if __name__ == "__main__":` guard.

    Raises:
      ValueError / KeyError / OSError: bad input, naming the config key, file or example; a
        repeated id with on_duplicate='error'; a split where no example passed the checks.
    """
    check_config(config)
    mapping = fields.from_config(config.fields)
    units = sources.plan(config, mapping)
    if not units:
        raise ValueError(f"config.sources: {config.sources or config.tfds.name} holds no example")
    layout = shards.Layout(version_dir(config), config.name, config.split, len(units))
    spec = metadata.features(mapping.outputs, bool(mapping.entities))
    # Before anything is created: a directory this tool did not write is left as it is.
    metadata.check_compatible(layout.version_dir, config.split, spec)
    os.makedirs(layout.state_dir, exist_ok=True)
    with _split_lock(layout):
        _check_resume(layout, config, units)
        shutil.rmtree(layout.tmp_dir, ignore_errors=True)  # what killed writers left
        markers = _convert_shards(layout, units, examples.Options.from_config(config), config)
        return _finish(config, layout, markers, spec)


def _finish(config, layout: shards.Layout, markers: list[dict], spec) -> dict[str, Any]:
    """Once every shard is done: repeated ids, summary.json, split.json, tfds metadata."""
    duplicates = dedup.find(layout, markers, spec)
    if duplicates and config.on_duplicate == "error":
        d = duplicates[0]
        raise ValueError(
            f"duplicate id {d.id!r}: {d.first_where} and {d.where} ({len(duplicates)} repeated "
            "ids in all); set config.on_duplicate=keep_first to keep each id's first example "
            "(the shards written so far are kept: the rerun only removes the repeats)"
        )
    lengths = dedup.drop(layout, markers, duplicates)
    summary = _summary(config, markers, duplicates)
    summary_path = os.path.join(layout.state_dir, "summary.json")
    shards.write_json(summary_path, summary)
    if summary["num_examples"] == 0:
        raise ValueError(
            f"split {config.split!r}: no example passed the checks; {summary_path} counts the reasons"
        )
    record = {
        "shard_lengths": lengths,
        "num_bytes": sum(os.path.getsize(layout.shard_path(i)) for i in range(len(markers))),
        "features": sorted(spec.keys()),
        "texts": [k for k in spec.keys() if k not in fields.RESERVED],
        "entities": "entities" in spec.keys(),
    }
    shards.write_json(os.path.join(layout.state_dir, metadata.SPLIT_RECORD), record)
    metadata.publish(layout.version_dir, config.name, config.version)
    return summary


@contextlib.contextmanager
def _split_lock(layout: shards.Layout) -> Iterator[None]:
    """Holds convert/SPLIT/.lock: a second conversion of the same split fails at once."""
    fd = os.open(os.path.join(layout.state_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another conversion of split {layout.split!r} into {layout.version_dir} is "
                "running; wait for it or stop it"
            ) from None
        yield
    finally:
        os.close(fd)


def _fingerprint(config: ml_collections.ConfigDict, units: list) -> dict[str, Any]:
    """What the shards depend on: the config less RUNTIME_KEYS, and the inputs with sizes."""
    inputs = []
    for u in units:
        path = getattr(u, "path", None)
        size = os.path.getsize(path) if path and os.path.isfile(path) else None
        inputs.append({"unit": u.description, "bytes": size})
    saved = json.loads(config.to_json())
    for key in RUNTIME_KEYS:
        saved.pop(key, None)
    return {"config": saved, "inputs": inputs}


def _check_resume(layout: shards.Layout, config: ml_collections.ConfigDict, units: list) -> None:
    """Stores the fingerprint on the first run; later runs must match it (ValueError naming
    the changed keys or the first changed input)."""
    path = os.path.join(layout.state_dir, "config.json")
    now = _fingerprint(config, units)
    if not os.path.exists(path):
        shards.write_json(path, now)
        return
    with open(path) as f:
        before = json.load(f)
    start_over = (
        f"convert into another config.out_dir / name / version / split, or delete "
        f"{layout.state_dir} and {layout.shard_path(0).rsplit('-', 3)[0]}-* to start this split over"
    )
    changed = config_lib.changed_keys(before["config"], config, ignore=RUNTIME_KEYS)
    if changed:
        keys = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changed)
        raise ValueError(
            f"split {layout.split!r} was converted with another config: {keys}; {start_over}"
        )
    if before["inputs"] != now["inputs"]:
        diff = next(
            (f"{a} != {b}" for a, b in zip(before["inputs"], now["inputs"]) if a != b),
            f"{len(before['inputs'])} units then, {len(now['inputs'])} now",
        )
        raise ValueError(
            f"split {layout.split!r}: the input files changed since it was started ({diff}); {start_over}"
        )


def _convert_shards(
    layout: shards.Layout, units: list, options: examples.Options, config: ml_collections.ConfigDict
) -> list[dict[str, Any]]:
    """Every shard's marker record, converting the shards without one."""
    markers = [shards.read_marker(layout, i) for i in range(len(units))]
    todo = [shards.Job(i, u, layout, options) for i, u in enumerate(units) if markers[i] is None]
    workers = config.num_workers or len(os.sched_getaffinity(0))
    bar = tqdm.tqdm(
        total=len(units),
        initial=len(units) - len(todo),
        desc=f"{config.name}/{config.split}",
        unit="shard",
        disable=not config.verbose,
        dynamic_ncols=True,
    )
    start, read = time.monotonic(), 0

    def done(record: dict[str, Any]) -> None:
        nonlocal read
        markers[record["index"]] = record
        read += record["num_read"]
        bar.set_postfix_str(f"{read / max(time.monotonic() - start, 1e-9):.0f} examples/s")
        bar.update(1)

    try:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                done(_run_job(job))
        else:
            _run_pool(todo, min(workers, len(todo)), done)
    finally:
        bar.close()
    return markers


def _run_job(job: shards.Job) -> dict[str, Any]:
    """convert_shard, with a bad-input error naming the unit when it does not name its source."""
    try:
        return shards.convert_shard(job)
    except (ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if job.unit.source in message:
            raise
        raise ValueError(f"{job.unit.description}: {message}") from e


def _run_pool(todo: list[shards.Job], workers: int, done) -> None:
    """Runs the jobs in `workers` spawned processes (spawned, not forked: the caller may hold
    threads, e.g. jax's, that do not survive a fork). On the first error the queued jobs are
    dropped, the running ones finish (their shards stay done) and the error is raised."""
    pool = futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(os.getpid(),),
    )
    try:
        pending = [pool.submit(_run_job, job) for job in todo]
        for future in futures.as_completed(pending):
            done(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent_pid: int) -> None:
    """Makes a worker exit when the converting process is gone (a killed parent would
    otherwise leave it waiting on its task queue forever) and leaves Ctrl-C to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def _summary(config, markers, duplicates) -> dict[str, Any]:
    """summary.json: totals over the shards, skips per reason with the first few examples,
    repeated ids (dropped with keep_first), what was done to the kept images."""
    total = shards.ShardStats()
    for m in markers:
        total.merge(shards.ShardStats(m))
    for d in duplicates:
        total.skip(Skipped(DUPLICATE_ID, d.id, d.where, f"first at {d.first_where}"))
        total.drop(d.image, d.empty_texts)
    return {
        "dataset": config.name,
        "version": config.version,
        "split": config.split,
        "data_dir": os.path.abspath(config.out_dir),
        "num_shards": len(markers),
        **total.to_json(),
        "on_duplicate": config.on_duplicate,
    }
