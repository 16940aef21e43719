"""Model families behind one face, and their registry.

Every family module (``t5``, ``vit``, ``decoder``, or one a user registers) provides:

* ``Config`` (a frozen dataclass), ``Model`` (an ``nnx.Module`` built as
  ``Model(config, rngs=...)``) and ``config(name, **overrides) -> Config``;
* ``abstract_params(config)``: the parameter tree as ``jax.ShapeDtypeStruct`` leaves;
* ``MOE_FIELDS``: the ``Config`` fields holding a ``MoeConfig`` (``("moe",)``, or T5's
  ``("encoder_moe", "decoder_moe")``) and ``MLP_WIDTH_FIELD``: the field of the dense MLP's
  hidden width f (virtual groups make experts f/G wide);
* ``moe_layer_names(config)``: the MoE layers' names, in the order of the model's
  ``expert_load`` rows;
* ``TASK``: what its data looks like — ``"seq2seq"`` (encoder/decoder tokens), ``"lm"``
  (tokens) or ``"images"`` (image, label);
* ``forward(model, batch, train, rng) -> (logits, targets, weights, aux)`` on a data batch;
* ``example_inputs(config, seed)``: the positional inputs of a small fixed batch for
  ``model(*inputs, train=False)`` (what ``verify`` compares);
* ``batch_lengths(batch) -> (batch size, input length, target length)`` from a batch (a dict
  of arrays or shapes, or a tuple) and ``forward_flops(config, b, s, l, train)``: model FLOPs
  of one forward pass by component (``flop_terms.py`` holds the terms, ``flops.py`` the
  formulas); ``TOKENS_KEY``: the batch key counted for tokens/s (None for images);
* ``HF_MAP`` (the module path of its Hugging Face map in ``checkpoints/``, or None) and
  ``HF_MODEL_TYPES`` (the ``config.json`` ``model_type`` values that map reads).

Everything outside ``models/`` asks this registry (``get(config.model.family)``) instead of
naming a family.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_upcycle.checkpoints.tree import flatten, unflatten
from sparse_upcycle.models import decoder, t5, vit
from sparse_upcycle.models.moe_config import MoeConfig

FACE = (
    "Config",
    "Model",
    "config",
    "abstract_params",
    "MOE_FIELDS",
    "MLP_WIDTH_FIELD",
    "moe_layer_names",
    "TASK",
    "forward",
    "example_inputs",
    "batch_lengths",
    "forward_flops",
    "TOKENS_KEY",
    "HF_MAP",
    "HF_MODEL_TYPES",
)
TASKS = ("seq2seq", "lm", "images")

FAMILIES: dict[str, ModuleType] = {}


def register(name: str, module) -> None:
    """Add a family (any object with the face above, usually a module)."""
    missing = [attr for attr in FACE if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"model family {name!r} lacks {missing}")
    if module.TASK not in TASKS:
        raise TypeError(f"model family {name!r}: TASK must be one of {TASKS}, got {module.TASK!r}")
    FAMILIES[name] = module


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def names() -> list[str]:
    return sorted(FAMILIES)


def get(name: str):
    """The family module registered as ``name``; ValueError naming the known ones."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"model.family must be one of {names()}, got {name!r}") from None


def family_of(config) -> str:
    """The registered name of the family whose ``Config`` ``config`` is."""
    for name, module in FAMILIES.items():
        if type(config) is module.Config:
            return name
    raise ValueError(f"{type(config).__name__} is the config of no registered model family")


def for_hf_model_type(model_type: str | None) -> str | None:
    """The family whose HF map reads ``config.json``'s ``model_type`` (None if none does)."""
    for name, module in FAMILIES.items():
        if model_type in module.HF_MODEL_TYPES:
            return name
    return None


def hf_map(name: str) -> ModuleType:
    """The family's Hugging Face map (``checkpoints/hf_<family>.py``)."""
    module = get(name)
    if module.HF_MAP is None:
        raise ValueError(f"model family {name!r} has no Hugging Face map")
    return importlib.import_module(module.HF_MAP)


def moe_blocks(config) -> dict[str, MoeConfig]:
    """The ``MoeConfig`` fields of a model config that have experts, by field name."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if isinstance(getattr(config, f.name), MoeConfig) and getattr(config, f.name).num_experts
    }


def target_shapes(name: str, config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat parameter paths -> (shape, dtype) of the family's model for ``config``."""
    abstract = get(name).abstract_params(config)
    return {p: (tuple(s.shape), np.dtype(s.dtype)) for p, s in flatten(abstract).items()}


def in_float32(model_config):
    """``model_config`` with float32 activations (a family config without ``dtype`` as is):
    how ``upcycle`` (prompted routers) and ``verify`` run a model on the host."""
    if any(f.name == "dtype" for f in dataclasses.fields(model_config)):
        return dataclasses.replace(model_config, dtype="float32")
    return model_config


def build_model(name: str, config, flat_params: dict):
    """The family's model for ``config`` holding ``flat_params`` (flat ``/`` paths)."""
    model = get(name).Model(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, unflatten(flat_params)))
    nnx.update(model, state)
    return model


for _name, _module in (("t5", t5), ("vit", vit), ("decoder", decoder)):
    register(_name, _module)
