"""Datasets: `get_builder(name, data_dir, **kwargs)` returns a prepared tfds builder.

DATASETS holds the datasets this codebase can generate itself (offline) when they are missing,
each registered by its package here as build(data_dir, *, prepare, **kwargs) -> builder; any
other name is a tfds dataset that must already be prepared.
"""

import os

import tensorflow_datasets as tfds

from mlcd.registry import Registry

DATASETS = Registry("dataset", autoload=("input_pipeline.datasets",))


def get_builder(
    name: str, data_dir: str | os.PathLike | None, *, build: bool = True, **kwargs
) -> tfds.core.DatasetBuilder:
    """A prepared tfds builder for `name` in `data_dir`.

    'synthetic_scenes' is built there if missing (kwargs: its sizes, image_size, seed,
    vocab_size), unless build=False (then a missing one is a FileNotFoundError and nothing is
    written). Any other name (tfds syntax, e.g. "mnist" or "my_ds/config:1.0.0") must already
    be prepared in data_dir: nothing is downloaded here.
    """
    if not name:
        raise ValueError(
            "config.data.name is not set: name the dataset (for one written by "
            "input_pipeline.convert, its directory under data_dir)"
        )
    if not data_dir:
        raise ValueError(f"dataset {name!r} needs a data_dir (got {data_dir!r})")
    data_dir = os.fspath(data_dir)
    if name in DATASETS:
        return DATASETS.get(name)(data_dir, prepare=build, **kwargs)
    if kwargs:
        raise ValueError(
            f"options {sorted(kwargs)} only apply to buildable datasets {DATASETS.names()}, "
            f"not to {name!r}"
        )
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data_dir {data_dir} does not exist (looking for dataset {name!r})"
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"dataset {name!r} is neither registered nor prepared in {data_dir}"
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in {data_dir} (expected {builder.data_dir}); "
            "prepare it there first"
        )
    return builder
