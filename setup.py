"""Install: `pip install -e .[test]`. Pins are compatible ranges around the versions the stack was
validated with (see README, "Stack"); jax/flax/orbax/grain APIs moved a lot, so the lower bounds
matter (jax.shard_map + check_vma, jax.set_mesh, nnx.Optimizer(..., wrt=))."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1.0,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "array_record>=0.8.6,<0.9",
    "pyarrow>=17,<30",  # parquet sources of python -m input_pipeline.convert
    "grain>=0.2.18,<0.3",
    "numpy>=2.1,<3",
    "pillow>=11,<14",
    "tokenizers>=0.23,<0.24",
    "sentencepiece>=0.2.1,<0.3",
    # CLIP BPE text cleaning and word splitting (open_clip's, for identical token ids).
    "ftfy>=6.3,<7",
    "regex>=2024.11.6",  # calendar versions: no major version to stay below
    "tqdm>=4.66,<5",
    "tensorboardX>=2.6.2,<3",
    "matplotlib>=3.9,<4",
    "scikit-learn>=1.6,<2",
]

setup(
    name="mlcd",
    version="0.1.0",
    description="Config-driven JAX/Flax pretraining of visual encoders: CLIP/SigLIP, MLCD, MOFI, DreamLIP.",
    packages=find_packages(
        include=["mlcd", "mlcd.*", "input_pipeline", "input_pipeline.*", "configs"]
    ),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8,<10", "ruff>=0.6", "faiss-cpu>=1.9,<2"],
        "faiss": ["faiss-cpu>=1.9,<2"],
        # pyahocorasick: bench/annotate.py's comparison matcher (mlcd.annotate does not use it).
        "bench": ["faiss-cpu>=1.9,<2", "pyahocorasick>=2.1,<3"],
        # open_clip (with torch) for the weight-conversion parity tests: mlcd itself reads and
        # writes PyTorch weights without torch (mlcd/torch_files.py).
        "torch": ["open_clip_torch>=3.3,<4"],
    },
)
