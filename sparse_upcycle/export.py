"""``sparse-upcycle export``: our checkpoints to Hugging Face directories, and back.

``--format hf`` writes what ``transformers`` ``from_pretrained`` loads: ``config.json`` and
safetensors (one ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` above ``--max-shard-size``), for

* a decoder: dense as ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` (the
  family it came from: ``DecoderConfig.model_type``, ``hf_llama.dense_problems``); MoE as the
  MoE class of that family: ``MixtralForCausalLM`` (llama), ``Qwen2MoeForCausalLM`` (qwen2;
  with its gated shared expert) or ``Qwen3MoeForCausalLM`` (qwen3), in transformers 5.x's
  fused expert layout (``mlp.experts.gate_up_proj`` [E, 2f, d], ``mlp.experts.down_proj``
  [E, d, f], ``mlp.gate.weight`` [E, d]) or, with ``--moe-layout per_expert``, the per-expert
  layout that 4.x reads (Mixtral's ``block_sparse_moe.experts.{j}.w1/w2/w3``, the Qwen MoEs'
  ``mlp.experts.{j}.gate_proj/up_proj/down_proj``). An MoE that the class would compute
  differently is refused in one line, naming the class that would hold it if one does
  (``hf_llama.moe_problems``; ``checkpoints/hf_qwen_moe.py``);
* a dense T5 as ``T5ForConditionalGeneration`` and a dense ViT as ``ViTForImageClassification``
  (``ViTModel`` without a head). HF has no class for our T5/ViT MoE layers: refused.

``--format orbax`` writes our own layout (``checkpoint/`` + ``recipe.json``, what ``upcycle``
writes, with ``"recipe": null``), e.g. to bring an HF model in.

Whatever came with an HF source (its ``config.json``, tokenizer and generation files, and the
few tensors our layout folds or drops: ViT's class-token position and pooler) is kept in
``hf_source/`` next to our checkpoint (``upcycle`` does the same), and an HF export starts from
it: an HF model taken through our format and back has the same tensors, bit for bit, and the
same ``config.json``. ``--dtype auto`` writes the dtype that config names (float32 without one).

From our layout (``upcycle``/``train`` outputs) tensors are read, converted and written one at
a time, each streamed into its shard file (one tensor in memory). An HF directory as ``--src``
is read whole into memory first (``checkpoints/hf.py``): bringing a 7B model in takes ~28 GB
in float32; ``upcycle`` reads a dense HF decoder lazily instead. The output goes to a
temporary directory renamed to ``--dst`` only when complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from sparse_upcycle import models
from sparse_upcycle.checkpoints import hf_write
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import HFCheckpoint, parse_size
from sparse_upcycle.checkpoints.layout import (
    CHECKPOINT_DIR,
    HF_SOURCE_DIR,
    read_hf_side,
    save_hf_source,
    write_recipe_json,
)
from sparse_upcycle.checkpoints.open import open_checkpoint
from sparse_upcycle.checkpoints.orbax import StreamingWriter
from sparse_upcycle.checkpoints.output import TempOutput
from sparse_upcycle.checkpoints.reader import CheckpointReader
from sparse_upcycle.config import ConfigError
from sparse_upcycle.task import resolve_model

# --------------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """A model to export: its family and config, and its tensors read one at a time."""

    family: str  # a registered model family (models.get)
    config: Any
    keys: list[str]
    read: Callable[[str], np.ndarray]
    format: str
    path: str
    step: int | None = None
    hf_dir: str | None = None  # holds the source's config.json, tokenizer, extras
    recipe: dict | None = None
    handle: CheckpointReader | None = None  # the checkpoint reader


def open_source(
    src: str, src_format: str = "auto", config=None, hf_source: str | None = None
) -> Source:
    """The model at ``src``: an ``upcycle``/``export`` output (``recipe.json``), an HF
    directory, or any other checkpoint this tool reads together with the experiment
    ``config`` that describes its model (e.g. a ``train`` checkpoint step directory).
    ``hf_source`` (an HF directory, or an ``upcycle`` output holding ``hf_source/``) gives
    the HF config, tokenizer and generation files when ``src`` does not carry them; for a
    ``train`` step directory it defaults to the ``hf_source/`` that ``train`` keeps in its
    workdir when it started from an HF model (directly or through ``upcycle``)."""
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    ckpt = open_checkpoint(src, src_format)
    if ckpt.is_upcycled:
        assert ckpt.family is not None and ckpt.info is not None
        hf_dir = os.path.join(src, HF_SOURCE_DIR)
        source = Source(
            ckpt.family,
            ckpt.model_config,
            ckpt.keys(),
            ckpt.read,
            "orbax",  # our layout: an Orbax checkpoint + recipe.json
            src,
            ckpt.step,
            hf_dir if os.path.isfile(os.path.join(hf_dir, "config.json")) else None,
            ckpt.info.get("recipe"),
            ckpt,
        )
    elif ckpt.format == "hf":
        assert ckpt.family is not None
        source = Source(ckpt.family, ckpt.config, ckpt.keys(), ckpt.read, "hf", src, None, src)
        source.handle = ckpt
    else:
        if config is None:
            raise ConfigError(
                f"{src} is a {ckpt.format} checkpoint without a model description; pass "
                "the experiment config it was trained with (--config CONFIG.py[:arg])"
            )
        if hf_source is None:  # a `train` step directory: WORKDIR/checkpoints/STEP
            kept = os.path.join(src, os.pardir, os.pardir, HF_SOURCE_DIR)
            if os.path.isfile(os.path.join(kept, "config.json")):
                hf_source = os.path.normpath(kept)
        if hf_source is not None:  # model.name="checkpoint" takes the HF architecture
            ckpt = open_checkpoint(src, ckpt.format, config=_hf_model_config(hf_source))
        elif config.get("model", {}).get("name") == "checkpoint":
            raise ConfigError(
                "the config takes its architecture from a Hugging Face checkpoint "
                "(model.name='checkpoint'): pass that directory as --hf-source"
            )
        spec = resolve_model(config, ckpt)
        source = Source(
            spec.family, spec.config, ckpt.keys(), ckpt.read, ckpt.format, src, ckpt.step
        )
        source.handle = ckpt
    if hf_source is not None:
        source.hf_dir = _hf_side_dir(hf_source)
    _check_tensors(source)
    return source


def _hf_side_dir(path: str) -> str:
    for directory in (os.path.join(path, HF_SOURCE_DIR), path):
        if os.path.isfile(os.path.join(directory, "config.json")):
            return directory
    raise CheckpointError(
        f"--hf-source {path}: neither a Hugging Face directory nor an upcycle output with "
        f"{HF_SOURCE_DIR}/ (no config.json)"
    )


def _hf_model_config(path: str):
    """Our model config from the ``config.json`` of ``--hf-source`` (no tensors read)."""
    base, _ = read_hf_side(_hf_side_dir(path))
    assert base is not None
    family = models.for_hf_model_type(base.get("model_type"))
    if family is None:
        raise CheckpointError(f"--hf-source {path}: model_type {base.get('model_type')!r}")
    try:
        return models.hf_map(family).config_from_hf(base)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"--hf-source {path}: {e}") from None


def _check_tensors(source: Source) -> None:
    assert source.handle is not None
    target = models.target_shapes(source.family, source.config)
    missing = sorted(set(target) - set(source.keys))
    extra = sorted(set(source.keys) - set(target))
    if missing or extra:
        raise CheckpointError(
            f"{source.path}: the tensors do not match the model config (missing "
            f"{missing[:3]}, unexpected {extra[:3]})"
        )
    for key in source.keys:
        shape = tuple(source.handle.shape(key))
        if shape != target[key][0]:
            raise CheckpointError(
                f"{source.path}: {key} has shape {shape}, the model config says {target[key][0]}"
            )


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def export(
    src: str,
    dst: str,
    fmt: str = "hf",
    *,
    src_format: str = "auto",
    config=None,
    moe_layout: str = "fused",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    dropless: bool = False,
    hf_source: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``src`` to ``dst`` as ``fmt`` (``hf`` or ``orbax``); returns a summary dict.
    Nothing is written to ``dst`` unless everything succeeded; ``src`` is only read."""
    if fmt not in ("hf", "orbax"):
        raise ConfigError(f"--format must be hf or orbax, got {fmt!r}")
    hf_write.check_moe_layout(moe_layout)
    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    reads = [("--hf-source", hf_source)] if hf_source else []
    kept = os.path.normpath(os.path.join(src, os.pardir, os.pardir, HF_SOURCE_DIR))
    if not hf_source and os.path.isdir(kept):  # a train step's, which open_source reads
        reads.append(("the workdir's hf_source", kept))
    output = TempOutput(src, dst, kind="export", overwrite=overwrite, also_reads=reads)
    source = open_source(src, src_format, config, hf_source)
    base, extras = read_hf_side(source.hf_dir)
    hf_config, target_dtype = None, None
    if fmt == "hf":  # refuse before writing anything
        hf_config = hf_write.hf_config(source.family, source.config, base, dropless, source.path)
        target_dtype = hf_write.target_dtype(dtype, base)
    with output as tmp:
        if hf_config is not None and target_dtype is not None:
            summary = hf_write.write_hf(
                tmp,
                family=source.family,
                config=source.config,
                keys=source.keys,
                read=source.read,
                hf_config=hf_config,
                dtype=target_dtype,
                moe_layout=moe_layout,
                max_bytes=max_bytes,
                extras=extras,
                side_dir=source.hf_dir,
                progress=progress,
            )
        else:
            summary = _write_orbax(source, tmp, progress)
    return {"dst": dst, "format": fmt, "family": source.family, **summary}


def _write_orbax(source: Source, out: str, progress: bool) -> dict:
    writer = StreamingWriter(os.path.join(out, CHECKPOINT_DIR))
    try:
        for key in tqdm(source.keys, desc="export", unit="tensor", disable=not progress):
            writer.add(key, source.read(key))
        writer.close(step=source.step or 0)
    except BaseException:
        writer.abort()
        raise
    if isinstance(source.handle, HFCheckpoint):
        save_hf_source(source.handle, out)
    elif source.hf_dir is not None:
        shutil.copytree(source.hf_dir, os.path.join(out, HF_SOURCE_DIR))
    write_recipe_json(
        out,
        recipe=source.recipe,
        recipe_name=None,
        family=source.family,
        model=source.config,
        source_path=source.path,
        source_format=source.format,
        source_step=source.step,
        step=source.step or 0,
        optimizer_slots=0,
    )
    return {"architecture": source.family, "tensors": len(source.keys)}
