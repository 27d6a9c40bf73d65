"""Conversion of your own image-text data into a prepared tfds dataset (ArrayRecord shards) that
the trainer reads with --config.data.name=NAME --config.data.data_dir=OUT_DIR.

    python -m input_pipeline.convert --config configs/convert.py[:PRESET] \
        --config.name=my_data --config.out_dir=data --config.sources='shards/{00000..00099}.tar'

Presets: default (keep every decodable example, original image bytes), align (ALIGN's filters:
shorter side >= 200 px, aspect ratio <= 3, captions of 3-20 words) and small (images re-encoded
as JPEG with the shorter side capped at 256 px, to bound storage for small-resolution runs).
docs/data.md describes every key; an empty string or 0 means "not set" / "off".
"""

import ml_collections

from configs import common


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The output: OUT_DIR/NAME/VERSION holds the shards, dataset_info.json and features.json,
    # plus convert/SPLIT/ (summary.json and what a resumed run needs).
    c.name = ""  # tfds dataset name: lower-case letters, digits and '_', starting with a letter
    c.out_dir = "data"
    c.version = "1.0.0"
    c.split = "train"  # another split goes into the same dataset with a second run

    # The input: either files, or a prepared tfds dataset. `sources` is one or more patterns
    # joined by '::' (WebDataset's separator), each brace-expanded ('{00000..00099}', '{a,b}')
    # and then globbed ('*', '?', '[...]'). By extension: .tar/.tar.gz/.tgz WebDataset shards,
    # .parquet, .csv, .tsv, .jsonl tables. Image URLs are never fetched.
    c.sources = ""
    c.tfds = ml_collections.ConfigDict({"name": "", "data_dir": "", "split": "train"})

    # Source field of each output feature. Empty: the first present of the defaults
    # (input_pipeline/convert/fields.py): image <- jpg, jpeg, png, webp, image, filepath;
    # caption <- txt, caption, title, text; id <- key, __key__, id (else '<table file>#<row>').
    # texts: extra text features, ((source field, output feature), ...), e.g. long captions.
    # entities: a source field holding a list of strings (or a JSON list) -> 'entities'.
    c.fields = ml_collections.ConfigDict(
        {"image": "", "caption": "", "id": "", "texts": (), "entities": ""}
    )
    c.csv_separator = ""  # '' : ',' for .csv, '\t' for .tsv
    # Tables and tfds sources are cut into shards of this many rows (parquet with image bytes:
    # whole row groups, up to this many); a WebDataset tar is one shard whatever its size.
    c.rows_per_shard = 10_000

    # Examples failing a filter are skipped and counted in summary.json (0 = off).
    c.filters = ml_collections.ConfigDict(
        {
            "min_shorter_side": 0,  # pixels
            "max_aspect_ratio": 0.0,  # longer side / shorter side
            "caption_min_words": 0,
            "caption_max_words": 0,
        }
    )
    # Images are stored as their original bytes unless: the shorter side exceeds
    # max_shorter_side (0 = no cap; resized to it, JPEG), reencode is set (every image becomes
    # a JPEG), or the image is not RGB or grayscale (converted to RGB: PNG, JPEG if it was one).
    c.image = ml_collections.ConfigDict(
        {"max_shorter_side": 0, "reencode": False, "jpeg_quality": 95}
    )

    # A repeated id: 'error' (names the id and both places) or 'keep_first' (in shard order).
    c.on_duplicate = "error"
    c.num_workers = 0  # processes; 0 = every CPU this process may use, 1 = no subprocess
    c.verbose = True  # progress bar (rate and ETA)
    return c


def _align(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ALIGN's (Jia et al., 2021) image and alt-text filters that need no statistics over the
    whole corpus: shorter side >= 200 px, aspect ratio <= 3, 3-20 words."""
    c.filters.min_shorter_side = 200
    c.filters.max_aspect_ratio = 3.0
    c.filters.caption_min_words = 3
    c.filters.caption_max_words = 20
    return c


def _small(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every image a JPEG (quality 90) with the shorter side at most 256 px."""
    c.image.max_shorter_side = 256
    c.image.reencode = True
    c.image.jpeg_quality = 90
    return c


PRESETS = {"default": lambda c: c, "align": _align, "small": _small}


def get_config(arg=None):
    return common.select_preset("configs/convert.py", arg, PRESETS)(base_config())
