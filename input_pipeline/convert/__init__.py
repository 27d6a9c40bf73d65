"""python -m input_pipeline.convert: your image-text data -> a prepared tfds dataset.

    python -m input_pipeline.convert --config configs/convert.py[:PRESET] \
        --config.name=NAME --config.out_dir=OUT_DIR --config.sources='shards/{00000..00099}.tar'

Reads WebDataset tars (img2dataset's output), parquet / CSV / TSV / JSONL tables (image bytes in
a column, or image paths relative to the table) or a prepared tfds dataset, maps their fields
to the features 'id', 'image', 'caption' (+ extra texts, 'entities') as config.fields says,
decodes every image once and skips (and counts, in summary.json) what is undecodable, missing
or filtered out. The output, OUT_DIR/NAME/VERSION, is ArrayRecord shards with tfds metadata:
train on it with --config.data.name=NAME --config.data.data_dir=OUT_DIR, no registration.
Image URLs are never fetched: download them first (e.g. with img2dataset).

Modules: sources (inputs -> units), readers (a unit's records), fields (field mapping),
examples (record -> example or skip), shards (the worker: one unit -> one shard, done markers),
dedup (repeated ids), metadata (features, dataset_info.json), run (the whole split).
docs/data.md is the user's guide.
"""

from input_pipeline.convert.run import convert

__all__ = ["convert"]
