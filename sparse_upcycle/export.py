"""``sparse-upcycle export``: our checkpoints to Hugging Face directories, and back.

``--format hf`` writes what ``transformers`` ``from_pretrained`` loads: ``config.json`` and
safetensors (one ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` above ``--max-shard-size``), for

* a decoder: dense as ``LlamaForCausalLM``; MoE as ``MixtralForCausalLM``, in transformers
  5.x's fused expert layout (``mlp.experts.gate_up_proj`` [E, 2f, d], ``mlp.experts.down_proj``
  [E, d, f], ``mlp.gate.weight`` [E, d]) or, with ``--moe-layout per_expert``, Mixtral's
  per-expert layout (``block_sparse_moe.experts.{j}.w1/w2/w3``) that 4.x reads. An MoE that
  Mixtral would compute differently is refused (``hf_llama.mixtral_problems``);
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
a time (a shard's worth is buffered). An HF directory as ``--src`` is read whole into memory
first, as ``upcycle`` reads it (``checkpoints/hf.py``): bringing a 7B model in takes ~28 GB in
float32. The output goes to a temporary directory renamed to ``--dst`` only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from sparse_upcycle import __version__
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import ShardedSafetensorsWriter, parse_size
from sparse_upcycle.checkpoints.tree import LazyTree, check_output_path, make_output_tmpdir
from sparse_upcycle.config import ConfigError
from sparse_upcycle.surgeon import _remove_stale_partials

HF_SOURCE_DIR = "hf_source"
EXTRAS_FILE = "extras.safetensors"
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
MOE_LAYOUTS = {"fused": "fused", "per_expert": "legacy"}
# Files of an HF directory that are not carried into hf_source/ (weights, the index, the model
# card, which describes the source model, not ours).
_NOT_SIDE_FILES = re.compile(
    r"(.*\.(safetensors|bin|pt|pth|h5|msgpack|ckpt)|.*\.index\.json|README\.md|\.gitattributes)$"
)
_SIDE_FILE_MAX_BYTES = 200 << 20
# LlamaConfig keys MixtralConfig has no use for.
_LLAMA_ONLY = ("mlp_bias", "attention_bias", "pretraining_tp")
_HF_FAMILY = {"llama": "decoder", "t5": "t5", "vit": "vit"}


# --------------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """A model to export: its family and config, and its tensors read one at a time."""

    family: str  # t5 | vit | decoder
    config: Any
    keys: list[str]
    read: Callable[[str], np.ndarray]
    format: str
    path: str
    step: int | None = None
    hf_dir: str | None = None  # holds the source's config.json, tokenizer, extras
    recipe: dict | None = None
    handle: Any = None  # the checkpoint reader


def config_from_dict(family: str, values: dict):
    """A model config dataclass from its ``dataclasses.asdict`` JSON (``recipe.json``)."""
    from sparse_upcycle.models.moe_config import MoeConfig
    from sparse_upcycle.surgeon import family_module

    module = family_module(family)
    cls = {"t5": "T5Config", "vit": "ViTConfig", "decoder": "DecoderConfig"}[family]
    cls = getattr(module, cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if isinstance(v, dict):
            v = MoeConfig(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


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
    from sparse_upcycle.surgeon import RECIPE_FILE, open_checkpoint

    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    if os.path.isfile(os.path.join(src, RECIPE_FILE)):
        from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint

        try:
            with open(os.path.join(src, RECIPE_FILE), encoding="utf-8") as f:
                info = json.load(f)
            family = info["family"]
            model_cfg = config_from_dict(family, info["model"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{src}/{RECIPE_FILE}: unreadable ({e})") from None
        ckpt = OrbaxCheckpoint(os.path.join(src, "checkpoint"))
        hf_dir = os.path.join(src, HF_SOURCE_DIR)
        source = Source(
            family,
            model_cfg,
            ckpt.keys(),
            ckpt.read,
            "orbax",
            src,
            ckpt.step,
            hf_dir if os.path.isfile(os.path.join(hf_dir, "config.json")) else None,
            info.get("recipe"),
            ckpt,
        )
    else:
        ckpt = open_checkpoint(src, src_format)
        if ckpt.format == "hf":
            family = _HF_FAMILY[ckpt.model_family]
            source = Source(family, ckpt.config, ckpt.keys(), ckpt.read, "hf", src, None, src)
            source.handle = ckpt
        else:
            if config is None:
                raise ConfigError(
                    f"{src} is a {ckpt.format} checkpoint without a model description; pass "
                    "the experiment config it was trained with (--config CONFIG.py[:arg])"
                )
            from sparse_upcycle.task import resolve_model

            if hf_source is None:  # a `train` step directory: WORKDIR/checkpoints/STEP
                kept = os.path.join(src, os.pardir, os.pardir, HF_SOURCE_DIR)
                if os.path.isfile(os.path.join(kept, "config.json")):
                    hf_source = os.path.normpath(kept)
            if hf_source is not None:  # model.name="checkpoint" takes the HF architecture
                ckpt.config = _hf_model_config(hf_source)
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
    from sparse_upcycle.checkpoints.hf import MODEL_TYPES, _maps

    base, _ = _read_hf_side(_hf_side_dir(path))
    family = MODEL_TYPES.get(base.get("model_type"))
    if family is None:
        raise CheckpointError(f"--hf-source {path}: model_type {base.get('model_type')!r}")
    try:
        return _maps(family).config_from_hf(base)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"--hf-source {path}: {e}") from None


def _check_tensors(source: Source) -> None:
    from sparse_upcycle.surgeon import target_shapes

    target = target_shapes(source.family, source.config)
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
# hf_source/: what an HF source carries besides the tensors we keep.
# --------------------------------------------------------------------------------------------


def save_hf_source(checkpoint, dst_dir: str) -> None:
    """Copy an HF checkpoint's side files (config, tokenizer, generation config…) and the
    tensors our layout folds or drops into ``dst_dir/hf_source``."""
    out = os.path.join(dst_dir, HF_SOURCE_DIR)
    os.makedirs(out, exist_ok=True)
    src_dir = checkpoint.path
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if (
            os.path.isfile(path)
            and not _NOT_SIDE_FILES.fullmatch(name)
            and os.path.getsize(path) <= _SIDE_FILE_MAX_BYTES
        ):
            shutil.copy2(path, os.path.join(out, name))
    extras = {}
    if checkpoint.model_family == "vit":
        from sparse_upcycle.checkpoints import hf_vit

        extras = hf_vit.extras_from_hf(checkpoint.tensors)
    if extras:
        from safetensors.numpy import save_file

        save_file(extras, os.path.join(out, EXTRAS_FILE), metadata={"format": "pt"})


def _read_hf_side(hf_dir: str | None) -> tuple[dict | None, dict[str, np.ndarray]]:
    if hf_dir is None:
        return None, {}
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            base = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(base, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    extras = {}
    path = os.path.join(hf_dir, EXTRAS_FILE)
    if os.path.isfile(path):
        from safetensors.numpy import load_file

        extras = load_file(path)
    else:  # an HF directory read directly
        from sparse_upcycle.checkpoints.hf import LazySafetensors

        if base.get("model_type") == "vit":
            from sparse_upcycle.checkpoints import hf_vit

            extras = hf_vit.extras_from_hf(LazySafetensors(hf_dir))
    return base, extras


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


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _hf_tensors(source: Source, moe_layout: str, extras: dict) -> Iterator[tuple[str, np.ndarray]]:
    params = LazyTree(source.keys, source.read)
    if source.family == "decoder":
        from sparse_upcycle.checkpoints import hf_llama

        return hf_llama.iter_to_hf(params, source.config, moe_format=MOE_LAYOUTS[moe_layout])
    if source.family == "t5":
        from sparse_upcycle.checkpoints import hf_t5

        return hf_t5.iter_to_hf(params, source.config)
    from sparse_upcycle.checkpoints import hf_vit

    return hf_vit.iter_to_hf(params, source.config, extras)


def _hf_config(source: Source, base: dict | None, dropless: bool) -> dict:
    from sparse_upcycle.checkpoints import hf_llama, hf_t5, hf_vit

    module = {"decoder": hf_llama, "t5": hf_t5, "vit": hf_vit}[source.family]
    kwargs = {"dropless": dropless} if source.family == "decoder" else {}
    try:
        ours = module.config_to_hf(source.config, **kwargs)
    except ValueError as e:
        raise ConfigError(f"cannot export {source.path} to Hugging Face: {e}") from None
    if base is not None and base.get("model_type") == ours["model_type"]:
        try:
            unchanged = module.config_from_hf(base) == source.config
        except (ValueError, KeyError, TypeError):
            unchanged = False
        if unchanged:  # the source's model as it was: its config.json as it was
            return dict(base)
    return merge_hf_config(base, ours)


def _target_dtype(dtype: str, base: dict | None) -> np.dtype:
    if dtype == "auto":
        named = (base or {}).get("dtype") or (base or {}).get("torch_dtype") or "float32"
        if named not in DTYPES:
            raise ConfigError(f"the source config names dtype {named!r}; pass --dtype")
        return DTYPES[named]
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


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
    if moe_layout not in MOE_LAYOUTS:
        raise ConfigError(f"--moe-layout must be one of {sorted(MOE_LAYOUTS)}, got {moe_layout!r}")
    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dst_abs = check_output_path(src, dst, overwrite)
    source = open_source(src, src_format, config, hf_source)
    base, extras = _read_hf_side(source.hf_dir)
    if fmt == "hf":  # refuse before writing anything
        hf_config = _hf_config(source, base, dropless)
        target_dtype = _target_dtype(dtype, base)
    parent = os.path.dirname(dst_abs)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(parent, os.path.basename(dst_abs), "export")
    tmp = make_output_tmpdir(parent, f".export-{os.path.basename(dst_abs)}-{os.getpid()}-")
    try:
        if fmt == "hf":
            summary = _write_hf(
                source, tmp, hf_config, target_dtype, moe_layout, max_bytes, extras, progress
            )
        else:
            summary = _write_orbax(source, tmp, progress)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dst": dst, "format": fmt, "family": source.family, **summary}


def _write_hf(source, out, hf_config, target_dtype, moe_layout, max_bytes, extras, progress):
    dtype_key = (
        "torch_dtype" if "torch_dtype" in hf_config and "dtype" not in hf_config else "dtype"
    )
    hf_config[dtype_key] = target_dtype.name
    if moe_layout == "per_expert" and hf_config.get("model_type") == "mixtral":
        hf_config["torch_dtype"] = target_dtype.name  # the key transformers < 4.56 reads
    writer = ShardedSafetensorsWriter(out, max_bytes)
    stream = _hf_tensors(source, moe_layout, extras)
    for name, value in tqdm(stream, desc="export", unit="tensor", disable=not progress):
        writer.add(name, np.asarray(value).astype(target_dtype, copy=False))
    files = writer.close()
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if source.hf_dir is not None:  # tokenizer, generation config, … of the source
        for name in sorted(os.listdir(source.hf_dir)):
            path = os.path.join(source.hf_dir, name)
            if (
                os.path.isfile(path)
                and name not in ("config.json", EXTRAS_FILE)
                and not _NOT_SIDE_FILES.fullmatch(name)
                and os.path.getsize(path) <= _SIDE_FILE_MAX_BYTES
            ):
                shutil.copy2(path, os.path.join(out, name))
    return {
        "architecture": (hf_config.get("architectures") or ["?"])[0],
        "dtype": target_dtype.name,
        "files": files,
        "bytes": writer.total_bytes,
    }


def _write_orbax(source, out, progress):
    from sparse_upcycle.checkpoints.orbax import StreamingWriter
    from sparse_upcycle.surgeon import RECIPE_FILE, _checksums, _config_dict

    writer = StreamingWriter(os.path.join(out, "checkpoint"))
    try:
        for key in tqdm(source.keys, desc="export", unit="tensor", disable=not progress):
            writer.add(key, source.read(key))
        writer.close(step=source.step or 0)
    except BaseException:
        writer.abort()
        raise
    if source.format == "hf":
        save_hf_source(source.handle, out)
    elif source.hf_dir is not None:
        shutil.copytree(source.hf_dir, os.path.join(out, HF_SOURCE_DIR))
    model = _config_dict(source.config)
    info = {
        "package_version": __version__,
        "recipe": source.recipe,
        "recipe_name": None,
        "family": source.family,
        "model": model,
        "source": {
            "path": os.path.abspath(source.path),
            "format": source.format,
            "step": source.step,
            "sha256": _checksums(source.path),
        },
        "step": source.step or 0,
        "optimizer_slots": 0,
    }
    with open(os.path.join(out, RECIPE_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=str)
    return {"architecture": source.family, "tensors": len(source.keys)}
