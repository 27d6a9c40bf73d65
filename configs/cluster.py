"""Clustering for MLCD labels: teacher embeddings -> spherical k-means -> top-l centers per image.

    python -m mlcd.cluster --config configs/cluster.py:tiny [--config.key=value ...]

Presets: tiny (CPU: the synthetic_scenes train split of the tiny training presets, the CLIP tiny
run as teacher, 256 centers, l = 8, 20 iterations) and laion (the MLCD paper's scale: 1,048,576
centers, l = 8, image features, data streamed in chunks, centers sharded over all devices).
Outputs and their formats: mlcd/clustering/store.py. Re-running the same command resumes.
"""

import ml_collections

from configs import common


def base_config() -> ml_collections.ConfigDict:
    c = common.labelling_config("runs/clusters")
    # k-means and assignment run under this mesh: the centers are sharded along C over all its
    # devices (C must be divisible by the device count). The teacher runs data-parallel.
    c.mesh = (("data", -1),)
    c.data.caption_key = "long_caption"  # the text of features='image_text_mean'

    c.embed = ml_collections.ConfigDict()
    # 'image': the image embedding; 'image_text_mean': normalise(image emb + text emb), i.e. the
    # L2-normalised mean of the two unit vectors.
    c.embed.features = "image"
    c.embed.shard_size = 4096  # examples per embeddings/shard_*.npz: the unit of resumption
    c.embed.batch_size = 256  # images (texts) per teacher call

    c.kmeans = ml_collections.ConfigDict()
    c.kmeans.num_centers = 256
    c.kmeans.iterations = 20
    c.kmeans.seed = 0
    c.kmeans.init = "random"  # 'random' (C distinct rows) or 'kmeans++' (on a subsample)
    c.kmeans.init_sample_size = ml_collections.config_dict.placeholder(int)  # kmeans++ rows
    c.kmeans.backend = "jax"  # 'jax' (sharded, streaming) or 'faiss' (host memory, needs faiss)
    # None: all embeddings stay on the devices across iterations; an int streams them from the
    # shards in chunks of that many rows every iteration (N bounded by disk, not memory).
    c.kmeans.chunk_size = ml_collections.config_dict.placeholder(int)
    c.kmeans.save_every = 1  # iterations between saves of kmeans_state.npz (the resume point)
    # None: exact Lloyd. An int k_c: the candidate assignment (mlcd/clustering/kmeans.py), an
    # exact pass every refresh_every iterations and k_c centers scored per row in between. Each
    # save block restarts with an exact pass: keep save_every a multiple of refresh_every.
    c.kmeans.candidates = ml_collections.config_dict.placeholder(int)
    c.kmeans.refresh_every = 5

    c.assign = ml_collections.ConfigDict()
    c.assign.top_l = 8
    c.assign.chunk_size = 65_536  # rows per device transfer while assigning
    return c


def tiny_preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU try-out: the tiny training presets' data, teacher = the CLIP tiny run."""
    train = common.tiny_preset(common.base_config())
    c.data.name = train.data.name
    c.data.data_dir = train.data.data_dir
    c.data.build = ml_collections.ConfigDict(train.data.build.to_dict())
    c.data.split = "train"
    c.teacher.workdir = "runs/clip_tiny"
    c.out_dir = "runs/clusters_tiny"
    c.kmeans.num_centers = 256
    c.kmeans.iterations = 20
    c.assign.top_l = 8
    return c


def laion_preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """MLCD's paper scale: LAION-400M-style image-text data into 1,048,576 centers, l = 8.

    Expects a prepared tfds dataset `laion400m` (features 'id', 'image', 'caption') under
    data_dir and an exported teacher; adjust both with --config.data.* / --config.teacher.*.
    Sizes: 400M x 768 float32 embeddings are ~1.2 TB of shards; each k-means iteration streams
    them in 262,144-row chunks (0.8 GB, all-gathered on every device) against 1M / n local
    centers (3 GB in all), one tile at a time.
    """
    c.data.name = "laion400m"
    c.data.data_dir = "data"
    c.data.split = "train"
    c.data.caption_key = "caption"
    c.data.num_threads = 32
    c.teacher.export = "exports/clip_l14"
    c.out_dir = "runs/clusters_laion"
    c.embed.features = "image"
    c.embed.shard_size = 65_536
    c.embed.batch_size = 1024
    c.kmeans.num_centers = 1_048_576
    c.kmeans.iterations = 20
    c.kmeans.backend = "jax"
    c.kmeans.chunk_size = 262_144
    # Exact passes (every center scored) at iterations 0, 5, 10, 15; in between each row scores
    # its 8 candidates: ~4x less work per run (bench/kmeans.py: objective within 0.25% of
    # exact Lloyd). Candidates: 400M x 8 int32 = 12.8 GB, row-sharded over the devices.
    c.kmeans.candidates = 8
    c.kmeans.refresh_every = 5
    c.kmeans.save_every = 5
    c.assign.top_l = 8
    c.assign.chunk_size = 262_144
    return c


PRESETS = {"tiny": tiny_preset, "laion": laion_preset}


def get_config(arg=None):
    return common.select_preset("configs/cluster.py", arg, PRESETS)(base_config())
