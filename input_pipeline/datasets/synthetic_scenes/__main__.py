"""CLI: python -m input_pipeline.datasets.synthetic_scenes --data_dir D [--train_size N ...]."""

import argparse
import os
import sys

from input_pipeline.datasets.synthetic_scenes.builder import (
    ENTITIES_FILE,
    TOKENIZER_FILE,
    SyntheticScenesConfig,
    build,
)


def main(argv: list[str] | None = None) -> None:
    defaults = SyntheticScenesConfig.create()
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.datasets.synthetic_scenes",
        description="Generate the synthetic_scenes tfds dataset (ArrayRecord) offline.",
    )
    parser.add_argument("--data_dir", required=True, help="tfds data directory to build into")
    for key in ("train_size", "validation_size", "test_size", "image_size", "seed", "vocab_size"):
        parser.add_argument(f"--{key}", type=int, default=getattr(defaults, key))
    args = vars(parser.parse_args(argv))
    data_dir = args.pop("data_dir")
    try:
        builder = build(data_dir, **args)
    except ValueError as e:
        parser.error(str(e))
    root = os.fspath(builder.data_dir)
    print(f"synthetic_scenes ready in {root}")
    for split, info in builder.info.splits.items():
        print(f"  {split}: {info.num_examples} examples")
    print(f"  tokenizer: {os.path.join(root, TOKENIZER_FILE)}")
    print(f"  entities:  {os.path.join(root, ENTITIES_FILE)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
