"""Test set-up: 8 fake CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest. The fake
devices share the machine's cores: they prove sharding correctness, not speed.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "MLCD_TEST_COMPILATION_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
