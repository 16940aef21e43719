"""Writing a model of ours as a Hugging Face directory: ``config.json``, safetensors shards and
the source's side files. Shared by ``export --format hf`` (from a checkpoint) and ``upcycle
--output-format hf`` (straight from the dense sources, no intermediate checkpoint).

A model is given as its family, its config and ``read(path)`` over our flat parameter paths;
tensors are converted by the family's HF map one at a time and each is streamed into its shard
file (``ShardedSafetensorsWriter``), so memory holds one tensor (plus what ``read`` keeps).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from sparse_upcycle import models
from sparse_upcycle.checkpoints.chunked import Chunked
from sparse_upcycle.checkpoints.hf import ShardedSafetensorsWriter
from sparse_upcycle.checkpoints.layout import EXTRAS_FILE, is_side_file
from sparse_upcycle.checkpoints.tree import LazyTree
from sparse_upcycle.config import ConfigError

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
MOE_LAYOUTS = {"fused": "fused", "per_expert": "legacy"}
# LlamaConfig keys MixtralConfig has no use for.
_LLAMA_ONLY = ("mlp_bias", "attention_bias", "pretraining_tp")
# The HF MoE classes whose per-expert layout transformers 4.x reads.
_MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def merge_hf_config(base: dict | None, ours: dict) -> dict:
    """``ours`` (what our model config says) laid over the source's ``config.json``: the
    source's other keys (token ids, transformers_version, …) are kept, and where both say the
    same (``10000`` vs ``10000.0``) the source's spelling is kept."""
    if base is None:
        return dict(ours)
    out = dict(base)
    if base.get("model_type") != ours.get("model_type"):
        for key in _LLAMA_ONLY:
            out.pop(key, None)
    labels = base.get("id2label")
    for key, value in ours.items():
        if key in ("id2label", "label2id", "num_labels") and isinstance(labels, dict):
            if len(labels) == len(ours.get("id2label") or {}):
                continue  # the source's label names, not our LABEL_i placeholders
        if key == "rope_theta" and isinstance(out.get("rope_parameters"), dict):
            if out["rope_parameters"].get("rope_theta") != value:
                out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": value}
            # also top level: transformers 4.x ignores rope_parameters and would fall back to
            # its class default (MixtralConfig: 1e6, not Llama's 10000)
            out["rope_theta"] = out["rope_parameters"]["rope_theta"]
            continue
        if key in out and out[key] == value:
            continue
        out[key] = value
    return out


def _options(fn: Callable, **options) -> dict:
    """The ``options`` that ``fn`` (a family's HF map function) takes: a map declares the
    export options it has a use for (``moe_format``, ``dropless``, ``extras``) as parameters."""
    accepted = inspect.signature(fn).parameters
    return {name: value for name, value in options.items() if name in accepted}


def hf_config(family: str, config: Any, base: dict | None, dropless: bool, what: str) -> dict:
    """The ``config.json`` for our model ``config``, over the source's ``base`` (None without
    one); a model the HF class would compute differently is a ConfigError naming ``what``."""
    try:
        module = models.hf_map(family)
        ours = module.config_to_hf(config, **_options(module.config_to_hf, dropless=dropless))
    except ValueError as e:
        raise ConfigError(f"cannot export {what} to Hugging Face: {e}") from None
    if base is not None and base.get("model_type") == ours["model_type"]:
        try:
            unchanged = module.config_from_hf(base) == config
        except (ValueError, KeyError, TypeError):
            unchanged = False
        if unchanged:  # the source's model as it was: its config.json as it was
            return dict(base)
    return merge_hf_config(base, ours)


def target_dtype(dtype: str, base: dict | None) -> np.dtype:
    """``--dtype``: a name of ``DTYPES``, or ``auto`` (the dtype the source config names,
    float32 without one)."""
    if dtype == "auto":
        named = (base or {}).get("dtype") or (base or {}).get("torch_dtype") or "float32"
        if named not in DTYPES:
            raise ConfigError(f"the source config names dtype {named!r}; pass --dtype")
        return DTYPES[named]
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_moe_layout(moe_layout: str) -> None:
    if moe_layout not in MOE_LAYOUTS:
        raise ConfigError(f"--moe-layout must be one of {sorted(MOE_LAYOUTS)}, got {moe_layout!r}")


def write_hf(
    out: str,
    *,
    family: str,
    config: Any,
    keys: list[str],
    read: Callable[[str], np.ndarray],
    hf_config: dict,
    dtype: np.dtype,
    moe_layout: str,
    max_bytes: int,
    extras: dict,
    side_dir: str | None,
    progress: bool,
) -> dict:
    """Write the model into the (empty, temporary) directory ``out``: safetensors shards of at
    most ``max_bytes``, ``config.json`` (``hf_config`` with the dtype set) and the side files
    (tokenizer, generation config, …) of ``side_dir``. Returns the export summary."""
    hf_config = dict(hf_config)
    dtype_key = (
        "torch_dtype" if "torch_dtype" in hf_config and "dtype" not in hf_config else "dtype"
    )
    hf_config[dtype_key] = dtype.name
    if moe_layout == "per_expert" and hf_config.get("model_type") in _MOE_MODEL_TYPES:
        hf_config["torch_dtype"] = dtype.name  # the key transformers < 4.56 reads
    to_hf = models.hf_map(family).iter_to_hf
    options = _options(to_hf, moe_format=MOE_LAYOUTS[moe_layout], extras=extras)
    stream = to_hf(LazyTree(keys, read), config, **options)
    writer = ShardedSafetensorsWriter(out, max_bytes)
    try:
        for name, value in tqdm(stream, desc="export", unit="tensor", disable=not progress):
            if not isinstance(value, Chunked):
                value = np.asarray(value)
            writer.add(name, value.astype(dtype, copy=False))
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if side_dir is not None:  # tokenizer, generation config, … of the source
        for name in sorted(os.listdir(side_dir)):
            if name not in ("config.json", EXTRAS_FILE) and is_side_file(side_dir, name):
                shutil.copy2(os.path.join(side_dir, name), os.path.join(out, name))
    return {
        "architecture": (hf_config.get("architectures") or ["?"])[0],
        "dtype": dtype.name,
        "files": files,
        "bytes": writer.total_bytes,
    }
