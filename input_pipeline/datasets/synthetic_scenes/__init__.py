"""synthetic_scenes: the embedded default dataset (offline, deterministic, builds in ~a minute).

Scenes of 1-4 coloured shapes on grey-level backgrounds, with long captions (one sentence per
object + one for the background), noisy short captions, alt-texts (the short caption, 30% of the
time with a mention of an entity that is not pictured), entity ids, boxes linked to sentences,
per-pixel object labels (`segmentation`, 1.2.0) and probe labels. `build(data_dir, ...)` prepares
it (and, with prepare=False, opens an older version's build when the current one is not there);
`ZEROSHOT_TASKS` lists the zero-shot tasks.
"""

from input_pipeline.datasets import DATASETS
from input_pipeline.datasets.synthetic_scenes.builder import (
    ENTITIES_FILE,
    SPLITS,
    TOKENIZER_FILE,
    SyntheticScenes,
    SyntheticScenesConfig,
    build,
    generate_example,
)
from input_pipeline.datasets.synthetic_scenes.captions import (
    ZEROSHOT_TASKS,
    ZeroShotTask,
    entities,
    split_sentences,
)
from input_pipeline.datasets.synthetic_scenes.scenes import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    MAX_OBJECTS,
    PROBE_NAMES,
    SHAPES,
    SIZES,
)

DATASETS.register("synthetic_scenes")(build)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "COUNTS",
    "ENTITIES_FILE",
    "MAX_OBJECTS",
    "PROBE_NAMES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TOKENIZER_FILE",
    "ZEROSHOT_TASKS",
    "SyntheticScenes",
    "SyntheticScenesConfig",
    "ZeroShotTask",
    "build",
    "entities",
    "generate_example",
    "split_sentences",
]
