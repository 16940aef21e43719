"""JAX's persistent compilation cache for ``train`` and ``compare``.

A ``compare`` trains the same few programs many times (every seed of an arm has the same
shapes, and the train step takes its random key as an argument, so seeds do not change the
program); with the cache on disk, only the first run of each program pays XLA's compile time
and the others read it back. ``scripts/bench_loop.py`` measures what that saves.

Where: ``$SPARSE_UPCYCLE_JAX_CACHE`` if set (the empty string turns the cache off), else
``jax/`` in the package cache directory (``$SPARSE_UPCYCLE_CACHE``, default
``~/.cache/sparse_upcycle``, the directory the text pipeline caches its vocabulary in). JAX
keys every entry on the program, the compile options, the jax/jaxlib version and the device
kind, so a stale entry is never used for another program.
"""

from __future__ import annotations

import os

import jax

ENV = "SPARSE_UPCYCLE_JAX_CACHE"
# Compiles faster than this are not worth a disk entry (tiny eval programs).
MIN_COMPILE_SECONDS = 0.2


def cache_dir() -> str | None:
    """The directory the cache would use, or None when it is turned off."""
    if ENV in os.environ:
        return os.environ[ENV] or None
    base = os.environ.get("SPARSE_UPCYCLE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sparse_upcycle"
    )
    return os.path.join(base, "jax")


def enable(path: str | None = None) -> str | None:
    """Turn the persistent cache on at ``path`` (default ``cache_dir()``); returns the directory
    used, or None when it is off. A directory that cannot be created leaves it off."""
    path = path if path is not None else cache_dir()
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
