"""Input pipelines. Every pipeline yields numpy batches (this process's slice of the global
batch) and has a JSON-serialisable ``get_state``/``set_state``, which the trainer saves with
each checkpoint so that a resumed run sees exactly the batches an uninterrupted one would.

``data.name`` picks one: ``synthetic`` (tests, benchmarks), ``fashion_mnist`` (ViT; Debian
``dataset-fashion-mnist``), ``text`` (T5 span corruption / decoder LM on an English corpus;
Debian ``python3.11-doc``), ``token_shards`` (the same examples from a corpus you bring:
memory-mapped token shards at ``data.path``, written from text by
``sparse-upcycle tokenize``)."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ below imports them
    from sparse_upcycle.data.pipeline import DataUnavailable, GrainPipeline
    from sparse_upcycle.data.synthetic import SyntheticSource, make_synthetic_pipeline

# Re-exported, but imported on first use (grain and jax are heavy; the CLI parser imports a
# module of this package, ``text_to_shards``, and must stay quick).
_LAZY = {
    "DataUnavailable": "sparse_upcycle.data.pipeline",
    "GrainPipeline": "sparse_upcycle.data.pipeline",
    "SyntheticSource": "sparse_upcycle.data.synthetic",
    "make_synthetic_pipeline": "sparse_upcycle.data.synthetic",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# name -> (module, builder); modules are imported when their data set is asked for. Each module
# declares the ``data`` fields its builder reads (``DATA_FIELDS``); ``make_pipeline`` refuses
# the others. Every pipeline takes ``COMMON_FIELDS``: its name, batch and seed, and the sequence
# lengths of the trainer's default block (``train.default_config``: synthetic's), which a config
# keeps when it switches ``data.name`` (an image pipeline ignores them).
COMMON_FIELDS = frozenset({"name", "batch_size", "seed", "seq_len", "target_len"})
BUILDERS = {
    "synthetic": ("sparse_upcycle.data.synthetic", "make_synthetic_pipeline"),
    "fashion_mnist": ("sparse_upcycle.data.fashion_mnist", "make_fashion_mnist_pipeline"),
    "text": ("sparse_upcycle.data.text", "make_text_pipeline"),
    "token_shards": ("sparse_upcycle.data.token_shards", "make_token_shards_pipeline"),
}


def _fields(module: str) -> frozenset[str]:
    return importlib.import_module(module).DATA_FIELDS


def make_pipeline(data_config, family, model_config, split, *, process_index=0, process_count=1):
    """The pipeline ``data_config.name`` names, with shapes taken from the model config; a
    field no pipeline reads is refused (ValueError); one that only another pipeline reads is
    ignored with a warning (a config switched to ``synthetic`` for a smoke test keeps its
    ``path``, and no override can remove a field)."""
    name = data_config.get("name", "synthetic")
    if name not in BUILDERS:
        raise ValueError(f"unknown data.name {name!r}; known: {sorted(BUILDERS)}")
    module, builder = BUILDERS[name]
    module = importlib.import_module(module)
    known = COMMON_FIELDS | module.DATA_FIELDS
    others: set[str] | None = None  # fields of the other pipelines, read only when needed
    for field in sorted(data_config.keys()):
        if field not in known:
            if others is None:
                others = set()
                for other, _ in BUILDERS.values():
                    others |= _fields(other)
            if field in others:  # left by a config that switched data.name (to synthetic)
                import warnings

                readers = sorted(n for n, (m, _) in BUILDERS.items() if field in _fields(m))
                warnings.warn(
                    f"data.{field} is read by {' and '.join(readers)}, not by data.name "
                    f"{name!r}; ignored",
                    stacklevel=2,
                )
                continue
            from sparse_upcycle.config import unknown_field

            raise ValueError(unknown_field("data", field, known))
    build = getattr(module, builder)
    return build(
        data_config,
        family,
        model_config,
        split,
        process_index=process_index,
        process_count=process_count,
    )


__all__ = [
    "DataUnavailable",
    "GrainPipeline",
    "SyntheticSource",
    "make_pipeline",
    "make_synthetic_pipeline",
]
