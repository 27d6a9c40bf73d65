"""Entity annotation for MOFI (I2E): entities named in the alt-text, kept if a CLIP teacher agrees.

    python -m mlcd.annotate --config configs/annotate.py:tiny [--config.key=value ...]

Presets: tiny (CPU: the synthetic_scenes train split of the tiny training presets, its own
entities.json, the CLIP tiny run as teacher, ground-truth quality report) and web (MOFI's
setting: a prepared web image-text dataset, a user entity table of millions of entities, an
exported CLIP teacher). Outputs and their formats: mlcd/annotation/store.py. Re-running the
same command resumes; a changed config is refused, naming the key.
"""

import ml_collections

from configs import common


def base_config() -> ml_collections.ConfigDict:
    # The teacher needs a text tower; it may stay unset when filter.enabled is False.
    c = common.labelling_config("runs/annotations")
    c.data.text_key = "alt_text"  # the text feature searched for entity names and aliases
    # A feature with each example's true entity ids (-1 pads), e.g. synthetic_scenes'
    # 'entity_ids': annotations.json then reports precision and recall. None: no report.
    c.data.ground_truth = ml_collections.config_dict.placeholder(str)

    c.entities = ml_collections.ConfigDict()
    # A JSON / JSONL entity table (mlcd/entities.py). None: the dataset's own entities.json,
    # beside its data (synthetic_scenes writes one).
    c.entities.path = ml_collections.config_dict.placeholder(str)
    c.entities.aliases = True  # match aliases as well as names

    c.shard_size = 4096  # examples per candidates/scores shard: the unit of resumption

    c.filter = ml_collections.ConfigDict()
    # True: keep a candidate when cos(teacher image embedding, entity text embedding) >=
    # threshold, best first (threshold -1 keeps all, ranked). False: every candidate, in the
    # order the text names them, no teacher (similarities.npy is NaN).
    c.filter.enabled = True
    c.filter.threshold = 0.2
    c.filter.top_k = ml_collections.config_dict.placeholder(int)  # per image; None: max_labels
    c.filter.text = "name"  # the entity text: 'name' or 'name_description' ("name: description")
    c.filter.batch_size = 256  # images (texts) per teacher call

    c.labels = ml_collections.ConfigDict()
    c.labels.max_labels = 8  # l: entity ids per example in labels.npy (-1 padded)
    # Entities labelling fewer examples are dropped from the vocabulary (and the labels); 0
    # keeps the whole source table. The vocabulary is renumbered 0..C-1 (entities.json).
    c.labels.min_images_per_entity = 1

    c.report = ml_collections.ConfigDict()
    # With data.ground_truth: also report precision / recall at these thresholds (each a full
    # selection), next to the run's own and the unfiltered candidates'.
    c.report.thresholds = ()
    return c


def tiny_preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU try-out: the tiny training presets' data, teacher = the CLIP tiny run."""
    train = common.tiny_preset(common.base_config())
    c.data.name = train.data.name
    c.data.data_dir = train.data.data_dir
    c.data.build = ml_collections.ConfigDict(train.data.build.to_dict())
    c.data.split = "train"
    c.data.ground_truth = "entity_ids"
    c.teacher.workdir = "runs/clip_tiny"
    c.out_dir = "runs/annotations_tiny"
    c.shard_size = 4096
    # Measured on the validation split with the CLIP tiny teacher (docs/annotation.md): the
    # area under the ROC curve of true vs. not-pictured candidates is 0.87 with "name:
    # description" ("red circle: a round shape with no corners, solid red."), 0.66 with the
    # bare name; true candidates score 0.41 (median), the others -0.10.
    c.filter.text = "name_description"
    c.filter.threshold = 0.2
    c.labels.max_labels = 4  # synthetic_scenes has at most 4 objects per image
    c.labels.min_images_per_entity = 1
    c.report.thresholds = (0.0, 0.1, 0.3, 0.4)
    return c


def web_preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """MOFI's setting (I2E): web image-text pairs, a knowledge-base entity table, a CLIP teacher.

    Expects a prepared tfds dataset `laion400m` (features 'id', 'image', 'caption') under
    data_dir, an entity table (e.g. Wikidata entities with English labels, aliases and
    descriptions as JSONL) at entities/entities.jsonl, and an exported two-tower teacher; adjust
    them with --config.data.* / --config.entities.path / --config.teacher.*. The threshold,
    max_labels and min_images_per_entity are our choices (the MOFI paper does not give its
    values): tune the threshold on a labelled sample with data.ground_truth and
    report.thresholds. Sizes: a 2M-entity vocabulary matches ~9k captions/s per process and
    holds 0.3 GB (docs/annotation.md); text embeddings of 2M entities x 768 float32 are 6 GB.
    """
    c.data.name = "laion400m"
    c.data.data_dir = "data"
    c.data.split = "train"
    c.data.text_key = "caption"
    c.data.num_threads = 32
    c.entities.path = "entities/entities.jsonl"
    c.teacher.export = "exports/clip_l14"
    c.out_dir = "runs/annotations_web"
    c.shard_size = 65_536
    c.filter.threshold = 0.2
    c.filter.text = "name"
    c.filter.batch_size = 1024
    c.labels.max_labels = 8
    c.labels.min_images_per_entity = 5
    return c


PRESETS = {"tiny": tiny_preset, "web": web_preset}


def get_config(arg=None):
    return common.select_preset("configs/annotate.py", arg, PRESETS)(base_config())
