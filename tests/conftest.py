"""Test set-up: eight fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sparse_upcycle import host_memory  # noqa: E402  (no jax import)

host_memory.tune()  # before jax starts its threads, as the command line does


def pytest_configure(config):
    """One persistent JAX compilation cache for the session (many tests compile the same tiny
    models); ``SPARSE_UPCYCLE_JAX_CACHE=`` (empty) turns it off, as for the CLI."""
    from sparse_upcycle import compile_cache

    if compile_cache.ENV not in os.environ:
        os.environ[compile_cache.ENV] = str(config.cache.mkdir("jax_compilation_cache"))
    compile_cache.enable()
