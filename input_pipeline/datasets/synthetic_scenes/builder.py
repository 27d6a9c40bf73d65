"""tfds builder for synthetic_scenes: ArrayRecord shards plus tokenizer.json / entities.json.

Every example is a pure function of (seed, split, index): its generator is
np.random.default_rng([seed, split_index, index]), consumed in a fixed order (scene, long caption,
short caption, render), so any example can be regenerated alone with `generate_example`. The
alt-text's noise (1.1.0) draws from a second stream, np.random.default_rng([seed, split_index,
index, 1]), so every feature of 1.0.0 kept its exact value. The segmentation map (1.2.0) draws
from no stream at all (`scenes.segmentation` is a function of the scene), so every feature of
1.1.0 kept its exact value too.

A build is complete when tfds has prepared the version directory AND both side files exist in it.
tfds writes the shards into a temporary directory and renames it at the end, so an interrupted
generation never looks prepared; the side files are written atomically (temp file + os.replace)
and, if missing, are rebuilt from the stored train captions without regenerating any image.
"""

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent import futures

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath
from PIL import Image

from input_pipeline import tokenizers
from input_pipeline.datasets.synthetic_scenes import captions, scenes

VERSION = tfds.core.Version("1.2.0")
RELEASE_NOTES = {
    "1.2.0": "segmentation: per-pixel object labels, uint8 [R, R], 0 = background, j + 1 = "
    "object slot j (the slots of boxes / colors / shapes); a pixel is object j's where j's "
    "anti-aliased coverage is >= 0.5. Every 1.1.0 feature is unchanged.",
    "1.1.0": "alt_text: the short caption plus, 30% of the time, a mention of an entity that is "
    "not in the image (entity annotation's noise); every 1.0.0 feature is unchanged.",
    "1.0.0": "Initial release.",
}
SPLITS = ("train", "validation", "test")
TOKENIZER_FILE = "tokenizer.json"
ENTITIES_FILE = "entities.json"
_PARALLEL_MIN_EXAMPLES = 2000
_CHUNK = 64  # examples per worker task: amortises pickling/IPC, ~0.1 s of work


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """Sizes, resolution, seed and tokenizer size; the name encodes all of them (see `create`)."""

    train_size: int = 20000
    validation_size: int = 1000
    test_size: int = 2000
    image_size: int = 64
    seed: int = 0
    vocab_size: int = 1024

    @classmethod
    def create(cls, **options) -> "SyntheticScenesConfig":
        """Validated config named after its values, so different builds never share a directory.

        options: any of the fields above; an unknown one raises TypeError naming it.
        """
        cfg = cls(name="", version=VERSION, description="synthetic_scenes", **options)
        minimum = dict(
            train_size=1,
            validation_size=1,
            test_size=1,
            image_size=16,
            seed=0,
            vocab_size=tokenizers.BPE_BASE_VOCAB_SIZE + 1,
        )
        for key, low in minimum.items():
            value = getattr(cfg, key)
            if not isinstance(value, int | np.integer) or value < low:
                raise ValueError(
                    f"synthetic_scenes {key} must be an integer >= {low}, got {value!r}"
                )
        cfg.name = (
            f"train{cfg.train_size}_val{cfg.validation_size}_test{cfg.test_size}"
            f"_res{cfg.image_size}_seed{cfg.seed}_vocab{cfg.vocab_size}"
        )
        return cfg

    def split_size(self, split: str) -> int:
        return {
            "train": self.train_size,
            "validation": self.validation_size,
            "test": self.test_size,
        }[split]


def _padded(values, fill, dtype, shape=(scenes.MAX_OBJECTS,)) -> np.ndarray:
    out = np.full(shape, fill, dtype=dtype)
    out[: len(values)] = values
    return out


def generate_example(seed: int, split: str, index: int, image_size: int) -> dict:
    """Example `index` of `split`, with `image` as a uint8 [R, R, 3] array (PNG-encoded on write).

    Object slots j < num_objects are in placement order (the largest first); padding is -1 for
    ids and zeros for boxes. `segmentation` is uint8 [R, R]: 0 = background, j + 1 = slot j
    (`scenes.segmentation`).
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = scenes.sample_scene(rng)
    long_caption, box_sentence = captions.long_caption(scene, rng)
    short_caption = captions.short_caption(scene, rng)
    image = scenes.render(scene, rng, image_size)
    segmentation = scenes.segmentation(scene, image_size)  # uses no rng: nothing else changes
    # A stream of its own: drawing from `rng` would change every feature generated after it.
    alt_rng = np.random.default_rng([seed, SPLITS.index(split), index, 1])
    objs = scene.objects
    return {
        "id": f"{split}_{index:08d}",
        "image": image,
        "segmentation": segmentation,
        "long_caption": long_caption,
        "short_caption": short_caption,
        "alt_text": captions.alt_text(scene, short_caption, alt_rng),
        "num_objects": np.int32(len(objs)),
        "entity_ids": _padded([o.entity_id for o in objs], -1, np.int32),
        "colors": _padded([o.color for o in objs], -1, np.int32),
        "shapes": _padded([o.shape for o in objs], -1, np.int32),
        "sizes": _padded([o.size for o in objs], -1, np.int32),
        "boxes": _padded([o.box for o in objs], 0.0, np.float32, (scenes.MAX_OBJECTS, 4)),
        "box_sentence": _padded(box_sentence, -1, np.int32),
        "largest_shape": scene.largest.shape,
        "largest_color": scene.largest.color,
        "count": len(objs) - 1,
        "background": scene.background,
    }


def _encoded_example(seed: int, split: str, image_size: int, index: int) -> dict:
    """generate_example with the image PNG-encoded (what the tfds Image feature stores)."""
    example = generate_example(seed, split, index, image_size)
    buf = io.BytesIO()
    # compress_level=1: several times faster than the default 6 on noisy backgrounds.
    Image.fromarray(example["image"]).save(buf, format="PNG", compress_level=1)
    example["image"] = buf.getvalue()
    return example


@contextlib.contextmanager
def _example_map(num_examples: int):
    """Yields a `map(fn, iterable)` that keeps order: a process pool for big splits.

    Workers are spawned, not forked: the parent may run jax, whose threads do not survive fork.
    Spawning costs ~1-2 s, so splits under _PARALLEL_MIN_EXAMPLES are generated in-process.
    Workers never outlive the build process, however it ends (`_pool_worker_init`): SIGKILL,
    SIGTERM, Ctrl-C or an exception; multiprocessing's resource tracker, which holds a pipe
    open to the parent and to every worker, exits once they are all gone.
    """
    # CPUs this process may use (a container or taskset may allow fewer than os.cpu_count()).
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if num_examples < _PARALLEL_MIN_EXAMPLES or (workers or 1) < 2:
        yield map
        return
    # The kernel's parent-death signal fires when the *thread* that spawned a worker ends, not
    # the process: armed only when that is the main thread (the pool is used by the thread that
    # enters this context). The watchdog thread covers the other cases.
    death_signal = threading.current_thread() is threading.main_thread()
    pool = futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_pool_worker_init,
        initargs=(os.getpid(), death_signal),
    )
    try:
        yield lambda fn, items: pool.map(fn, items, chunksize=_CHUNK)
    finally:
        # On error / interruption, drop queued chunks instead of computing all of them.
        pool.shutdown(wait=True, cancel_futures=True)


# Seconds between two checks of a pool worker that its parent (the build process) is alive.
_PARENT_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _pool_worker_init(parent_pid: int, death_signal: bool) -> None:
    """Runs first in every pool worker: makes it exit as soon as the build process is gone.

    A ProcessPoolExecutor worker otherwise waits forever on its task queue once its parent is
    killed (it holds the queue's write end itself, so it never sees EOF): SIGKILL or SIGTERM of
    a build left the workers, and through them the resource tracker, running as orphans.
    """
    # Ctrl-C signals the whole foreground process group. The parent handles it (the pool is
    # shut down, queued chunks are dropped); in the workers it would only print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if death_signal and sys.platform.startswith("linux"):
        # Linux: the kernel sends SIGKILL when the parent dies, however it dies.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Any platform, and a parent that died before the death signal was armed: once the parent
    # is gone the worker is re-parented, so its parent pid changes.
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)  # no clean-up to do: the parent's build is gone, and with it the results


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
    """Scenes of 1-4 coloured shapes with long/short captions, alt-texts, entities, boxes,
    per-pixel object labels (segmentation) and probe labels."""

    VERSION = VERSION
    RELEASE_NOTES = RELEASE_NOTES
    # tfds derives code_path for builders inside packages via `importlib_resources`, which it
    # imports but does not depend on for Python >= 3.9 (ModuleNotFoundError on prepare). The path
    # is only used to look for a checksums file next to the code; there is none.
    code_path = epath.Path(__file__)

    def __init__(self, *, config: SyntheticScenesConfig | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config or SyntheticScenesConfig.create(), **kwargs)
        # Long + short train captions, set when this builder generated the train split (saves
        # reading 20k examples back to train the tokenizer).
        self.generated_train_captions: list[str] | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        r, k = self.builder_config.image_size, scenes.MAX_OBJECTS
        ints = lambda: tfds.features.Tensor(shape=(k,), dtype=np.int32)
        features = {
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            # A zlib-compressed tensor, not a PNG Image: ~140 bytes an example at 64 px (vs ~330
            # as PNG), decoded in ~20 us (vs ~100 us with PIL), and it comes back as [R, R]. The
            # training pipeline decodes every feature but the image, so decoding cost matters.
            "segmentation": tfds.features.Tensor(
                shape=(r, r), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            ),
            "long_caption": tfds.features.Text(),
            "short_caption": tfds.features.Text(),
            "alt_text": tfds.features.Text(),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
            "entity_ids": ints(),
            "colors": ints(),
            "shapes": ints(),
            "sizes": ints(),
            "boxes": tfds.features.Tensor(shape=(k, 4), dtype=np.float32),
            "box_sentence": ints(),
        }
        for key, names in scenes.PROBE_NAMES.items():
            features[key] = tfds.features.ClassLabel(names=names)
        # DatasetInfo(builder=self) rather than dataset_info_from_configs: the latter needs the
        # builder to live in a package with tfds metadata files, which this one does not ship.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # keep index i == example i (ids and regeneration rely on it)
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        """Yields (index, example) in index order; keeps the train captions for the tokenizer."""
        cfg = self.builder_config
        n = cfg.split_size(split)
        make = functools.partial(_encoded_example, cfg.seed, split, cfg.image_size)
        texts = []
        with _example_map(n) as map_fn:
            examples = map_fn(make, range(n))
            bar = tqdm.tqdm(examples, total=n, desc=f"synthetic_scenes/{split}", unit="img")
            for i, example in enumerate(bar):
                if split == "train":
                    texts += [example["long_caption"], example["short_caption"]]
                yield i, example
        if split == "train":
            self.generated_train_captions = texts


def _atomic_write(path: str, text: str) -> None:
    """Writes `text` to `path` so that readers see either no file or the whole file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def train_captions(builder: SyntheticScenes) -> list[str]:
    """Long and short captions of the train split, in index order.

    Taken from the generation run when there was one, else read back from the stored data (a
    crash between generation and writing the side files); both give the same list.
    """
    if builder.generated_train_captions is not None:
        return builder.generated_train_captions
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    texts = []
    for i in range(len(source)):
        ex = source[i]
        texts += [ex["long_caption"].decode(), ex["short_caption"].decode()]
    return texts


def write_side_files(builder: SyntheticScenes) -> None:
    """Writes entities.json and tokenizer.json (BPE on train captions + prompts) if missing."""
    root = os.fspath(builder.data_dir)
    entities_path = os.path.join(root, ENTITIES_FILE)
    if not os.path.exists(entities_path):
        _atomic_write(entities_path, json.dumps(captions.entities(), indent=1) + "\n")
    tokenizer_path = os.path.join(root, TOKENIZER_FILE)
    if not os.path.exists(tokenizer_path):
        corpus = train_captions(builder) + list(captions.prompt_texts())
        tok = tokenizers.train_bpe_tokenizer(corpus, vocab_size=builder.builder_config.vocab_size)
        _atomic_write(tokenizer_path, tok.to_json())


@contextlib.contextmanager
def _quiet_tfds_progress():
    """Hides tfds's own bars (no total, hence no ETA) while ours run; restores the setting."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)  # tfds has no public getter
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)


def build(data_dir: str | os.PathLike, *, prepare: bool = True, **options: int) -> SyntheticScenes:
    """Prepares synthetic_scenes under `data_dir` (if not already there) and returns its builder.

    prepare=False only opens it (nothing is written; evaluation never generates data). When the
    current VERSION is not prepared there but an older version of the same config is (a build
    made before an upgrade), that build is opened instead, newest first, with
    `tfds.builder_from_directory`: its own stored features (so it lacks the features added
    since, e.g. 1.1.0 has no `segmentation`), logged with a warning. FileNotFoundError if no
    version is prepared.

    options: the SyntheticScenesConfig fields train_size, validation_size, test_size,
    image_size, seed, vocab_size (defaults 20000 / 1000 / 2000 / 64 / 0 / 1024). Idempotent. The
    data lands in data_dir/synthetic_scenes/<config name>/<version>, with tokenizer.json and
    entities.json beside it. Splits of >= 2000 examples are generated by a spawned process pool,
    so a calling script needs the usual `if __name__ == "__main__":` guard.

    Builds of one config in several processes (sharing a filesystem) take turns on a lock file,
    `<config name>/.build.lock`: the second waits, then finds the data prepared. The holder of
    the lock removes the `incomplete.*` directories that killed builds of this config left.
    """
    if not data_dir:
        raise ValueError("synthetic_scenes.build needs a data_dir to write the dataset into")
    builder = SyntheticScenes(
        config=SyntheticScenesConfig.create(**options), data_dir=os.fspath(data_dir)
    )
    if not prepare:
        if builder.is_prepared():
            return builder
        older = _open_older_version(builder)
        if older is not None:
            return older
        raise FileNotFoundError(
            f"synthetic_scenes ({builder.builder_config.name}) is not prepared in "
            f"{os.fspath(data_dir)}; evaluation never generates data (looked for versions "
            f"{', '.join(_versions_newest_first())}): point --data_dir at the training run's "
            "data, or build it with python -m input_pipeline.datasets.synthetic_scenes"
        )
    root = os.fspath(builder.data_dir)
    if builder.is_prepared() and all(
        os.path.exists(os.path.join(root, f)) for f in (TOKENIZER_FILE, ENTITIES_FILE)
    ):
        return builder  # nothing to write: no lock (the data may be on a read-only filesystem)
    with _build_lock(os.path.dirname(root)) as locked:
        if locked:
            _remove_stale_incomplete_dirs(os.path.dirname(root))
        # Opened again: a build that held the lock before may have prepared the data meanwhile,
        # and a builder reads the dataset's info (splits, sizes) only when it is created.
        builder = SyntheticScenes(config=builder.builder_config, data_dir=os.fspath(data_dir))
        with _quiet_tfds_progress():
            builder.download_and_prepare()
        write_side_files(builder)
    return builder


def _versions_newest_first() -> list[str]:
    """Every released version (RELEASE_NOTES), the current one first."""
    return sorted(RELEASE_NOTES, key=tfds.core.Version, reverse=True)


def _open_older_version(builder: SyntheticScenes) -> tfds.core.DatasetBuilder | None:
    """A read-only builder of the newest older version of `builder`'s config prepared beside
    it (data_dir/synthetic_scenes/<config>/<version>), or None.

    Opened with tfds.builder_from_directory, which takes the features, splits and sizes from
    the stored dataset_info.json / features.json: this code's `_info` describes the current
    version, whose features an older build lacks. Only released versions are considered; a
    version directory counts as prepared once it holds dataset_info.json (tfds writes a version
    into an incomplete.* directory and renames it when done, so a partial one never qualifies).
    """
    config_dir = os.path.dirname(os.fspath(builder.data_dir))
    current = set(builder.info.features.keys())
    for version in _versions_newest_first():
        path = os.path.join(config_dir, version)
        if version == str(VERSION) or not os.path.isfile(os.path.join(path, "dataset_info.json")):
            continue
        older = tfds.builder_from_directory(path)
        missing = sorted(current - set(older.info.features.keys()))
        logging.warning(
            "synthetic_scenes (%s): version %s is not prepared in %s; opened the older build "
            "%s, which lacks the features %s",
            builder.builder_config.name,
            VERSION,
            config_dir,
            path,
            missing or "(none)",
        )
        return older
    return None


BUILD_LOCK_FILE = ".build.lock"
# The temporary directory tfds generates a version into (tfds.core.utils.file_utils
# ._get_incomplete_dir): 'incomplete.' + 6 random characters + '_' + the version directory.
_INCOMPLETE_DIR = re.compile(rf"incomplete\.[A-Z0-9]{{6}}_{re.escape(str(VERSION))}")
# What tfds writes into it: shards (and their temporary files), dataset_info.json,
# features.json, and one <feature>.labels.txt per ClassLabel.
_TFDS_FILE = re.compile(
    r"(incomplete\.[0-9a-fA-F]{32}\.)?"
    r"(synthetic_scenes-.+|dataset_info\.json|features\.json|[a-z_]+\.labels\.txt)"
)


@contextlib.contextmanager
def _build_lock(config_dir: str):
    """Holds an exclusive lock on `config_dir`/.build.lock while building; yields whether it
    holds it (False where the filesystem has no locks: the build then runs as before, without
    removing anything).

    flock, not a pid file: the kernel releases it when its holder dies, whatever kills it, so a
    lock that can be taken proves that no build() of this config is running (on this machine,
    or on another sharing the filesystem, where the filesystem supports locks).
    """
    os.makedirs(config_dir, exist_ok=True)
    path = os.path.join(config_dir, BUILD_LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        logging.warning("%s: cannot create the build lock (%s); building without it", path, e)
        yield False
        return
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            logging.warning(
                "%s: another build of this dataset is running (%s); waiting for it",
                config_dir,
                holder,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # no locks on this filesystem (ENOLCK, EOPNOTSUPP)
            logging.warning("%s: cannot lock (%s); building without the lock", path, e)
            locked = False
        if locked:  # who holds it, for the message of a build that has to wait
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield locked
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiter)


def _remove_stale_incomplete_dirs(config_dir: str) -> None:
    """Removes what killed builds of this config left in `config_dir`: tfds's temporary
    directories (tfds removes its own on an exception, but not when the process is killed).

    Called with the build lock held, so their writers are dead. Only directories named as tfds
    names them, holding only files named as tfds names them, are removed; anything else is
    left alone with a warning (never delete what the tool did not write).
    """
    for name in sorted(os.listdir(config_dir)):
        path = os.path.join(config_dir, name)
        if not _INCOMPLETE_DIR.fullmatch(name) or os.path.islink(path) or not os.path.isdir(path):
            continue
        entries = os.listdir(path)
        foreign = [
            e
            for e in entries
            if not _TFDS_FILE.fullmatch(e) or not os.path.isfile(os.path.join(path, e))
        ]
        if foreign:
            logging.warning(
                "%s: left in place: the directory of an interrupted build, but it holds files "
                "tfds does not write (%s)",
                path,
                ", ".join(sorted(foreign)[:3]),
            )
            continue
        logging.warning(
            "%s: removing what an interrupted build left (%d files)", path, len(entries)
        )
        shutil.rmtree(path)
