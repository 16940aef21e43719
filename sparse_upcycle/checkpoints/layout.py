"""Our own checkpoint layout: what ``upcycle`` and ``export --format orbax`` write.

```
DST/
  checkpoint/        Orbax: {"params": tree, "step": n[, "opt_state": per-parameter slots]}
  recipe.json        what this is and where it came from (the schema: ``write_recipe_json``)
  hf_source/         only for a Hugging Face source: its config.json, tokenizer and
                     generation files, and extras.safetensors (tensors our layout folds or
                     drops, e.g. ViT's class-token position and pooler)
```

This module is the only writer and reader of ``recipe.json`` and ``hf_source/``;
``UpcycledCheckpoint`` is the reader of the whole directory (``checkpoints/open.py`` opens it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from sparse_upcycle import __version__, models
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import HFCheckpoint, LazySafetensors
from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint
from sparse_upcycle.checkpoints.paths import check_entries, contained, is_contained, source_root
from sparse_upcycle.checkpoints.reader import CheckpointReader
from sparse_upcycle.models.moe_config import MoeConfig
from sparse_upcycle.upcycle.recipe import Recipe

RECIPE_FILE = "recipe.json"
CHECKPOINT_DIR = "checkpoint"
HF_SOURCE_DIR = "hf_source"
EXTRAS_FILE = "extras.safetensors"
# Files of an HF directory that are not carried into hf_source/ (weights, the index, the model
# card, which describes the source model, not ours).
_NOT_SIDE_FILES = re.compile(
    r"(.*\.(safetensors|bin|pt|pth|h5|msgpack|ckpt)|.*\.index\.json|README\.md|\.gitattributes)$"
)
_SIDE_FILE_MAX_BYTES = 200 << 20


def is_upcycle_output(path: str) -> bool:
    """Whether ``path`` is a directory in our layout (it holds ``recipe.json``)."""
    return os.path.isfile(os.path.join(path, RECIPE_FILE))


# --------------------------------------------------------------------------------------------
# recipe.json
# --------------------------------------------------------------------------------------------


def checksums(path: str) -> dict[str, str]:
    """sha256 of every file of the source (a directory's files, or the file). A symbolic link
    that resolves outside the source (``paths.source_root``) is recorded by its target,
    ``"link: /where"``, and not opened (nothing outside a source is read); a dangling one is
    ``"link: /where (missing)"``."""
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    )
    root = source_root(path)
    out = {}
    for file in files:
        name = os.path.relpath(file, path) if os.path.isdir(path) else os.path.basename(file)
        real = os.path.realpath(file)
        if not os.path.exists(real) or not is_contained(real, root):
            out[name] = f"link: {real}" + ("" if os.path.exists(real) else " (missing)")
            continue
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[name] = digest.hexdigest()
    return out


def config_dict(cfg) -> dict:
    """A model config dataclass as the JSON-ready dict ``recipe.json`` holds."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _typed(cls, values: dict, where: str) -> dict:
    """``values`` checked against dataclass ``cls``: every key one of its fields, every value
    of its default's JSON type (an int where the default is an int, a number for a float, a
    list for a tuple; no check where the default is None). ValueError naming ``where.key``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    out = {}
    for key, v in values.items():
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(
            type(default), ()
        )
        if isinstance(default, tuple):
            expected = (list, tuple)
        elif "tuple[" in str(f.type):  # e.g. MoeConfig.layers: "every_other" or [1, 3]
            expected = (*expected, list, tuple)
        wrong_bool = isinstance(v, bool) and not isinstance(default, bool)
        if v is not None and expected and (not isinstance(v, expected) or wrong_bool):
            raise ValueError(
                f"{where}.{key} must be {_JSON_NAMES.get(type(default), type(default).__name__)}"
                f", got {v!r}"
            )
        out[key] = tuple(v) if isinstance(v, list) else v
    return out


def config_from_dict(family: str, values: dict):
    """A model config dataclass from its ``config_dict`` form (``recipe.json``); ValueError
    for an unknown family, a field the family's ``Config`` does not have, or a value of
    another type than the field's default (a missing field takes its default)."""
    cls = models.get(family).Config
    kwargs = _typed(cls, values, "model")
    for name, v in kwargs.items():
        if isinstance(v, dict):
            kwargs[name] = MoeConfig(**_typed(MoeConfig, v, f"model.{name}"))
    return cls(**kwargs)


def recipe_from_dict(values: dict):
    """The ``Recipe`` of a ``recipe.json``'s ``recipe`` object (fields and types checked as
    ``config_from_dict`` does); ValueError naming the field."""
    return Recipe(**_typed(Recipe, values, "recipe"))


def write_recipe_json(
    directory: str,
    *,
    recipe: dict | None,
    recipe_name: str | None,
    family: str,
    model: Any,
    source_path: str,
    source_format: str,
    source_step: int | None,
    step: int,
    optimizer_slots: int,
    dense_model: Any = None,
    preserves_dense_function: bool | None = None,
    preservation: list[str] | None = None,
    sources: list[dict] | None = None,
    source_sha256: dict | None = None,
    name: str = RECIPE_FILE,
) -> dict:
    """Write ``directory/name`` (``recipe.json``) and return its content; ``source_sha256``
    is the source's checksums when the caller has them (hashed here otherwise). The schema,
    in key order:
    ``package_version``, ``recipe`` (``Recipe.to_dict()``, null for an ``export``),
    ``recipe_name``, ``family``, ``model`` (config of the tensors), ``dense_model`` (the dense
    config it was upcycled from), ``source`` (``path``, ``format``, ``step``, ``sha256`` of
    every file), ``sources`` (only with several dense sources: each one as ``source``),
    ``step``, ``optimizer_slots``, ``preserves_dense_function`` and
    ``preservation`` (why not, when it does not). ``dense_model`` and the last two are left
    out when None (an ``export --format orbax`` output has none)."""
    info: dict[str, Any] = {
        "package_version": __version__,
        "recipe": recipe,
        "recipe_name": recipe_name,
        "family": family,
        "model": config_dict(model),
    }
    if dense_model is not None:
        info["dense_model"] = config_dict(dense_model)
    info["source"] = {
        "path": os.path.abspath(source_path),
        "format": source_format,
        "step": source_step,
        "sha256": checksums(source_path) if source_sha256 is None else source_sha256,
    }
    if sources is not None:  # several dense sources, each as ``source`` (the caller hashed)
        info["sources"] = sources
    info["step"] = step
    info["optimizer_slots"] = optimizer_slots
    if preserves_dense_function is not None:
        info["preserves_dense_function"] = preserves_dense_function
    if preservation is not None:
        info["preservation"] = preservation
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=str)
    return info


def read_recipe_json(directory: str) -> dict:
    """The ``recipe.json`` of a directory in our layout (CheckpointError if none/unreadable)."""
    path = os.path.join(directory, RECIPE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory}: no {RECIPE_FILE}; not written by 'sparse-upcycle upcycle'"
        )
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: unreadable (not a JSON object)")
    # What the readers of our layout index (write_recipe_json's schema), and each one's type.
    for key in ("family", "model", "recipe"):
        if key not in info:
            raise CheckpointError(f"{path}: no {key!r} key; not written by 'sparse-upcycle'?")
    kinds = {
        "family": (str,),
        "model": (dict,),
        "recipe": (dict, type(None)),
        "dense_model": (dict, type(None)),
        "source": (dict, type(None)),
        "step": (int, type(None)),
        "preserves_dense_function": (bool,),
        "preservation": (list,),
    }
    for key, types in kinds.items():
        if key in info and not isinstance(info[key], types):
            names = " or ".join("null" if t is type(None) else _JSON_NAMES[t] for t in types)
            raise CheckpointError(
                f"{path}: {key!r} must be {names}, got {type(info[key]).__name__}"
            )
    if info["recipe"] is not None:
        try:
            recipe_from_dict(info["recipe"])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    return info


_JSON_NAMES = {str: "a string", dict: "an object", int: "an integer", bool: "true/false"}
_JSON_NAMES.update({list: "a list", float: "a number", tuple: "a list"})


class UpcycledCheckpoint(CheckpointReader):
    """A directory in our layout: the tensors (and optimizer slots) of ``checkpoint/``, with
    ``info`` its ``recipe.json``, ``model_config`` the config of those tensors, ``config`` the
    dense model it was upcycled from (None for an ``export`` output), ``dense_step`` the
    source's step. ``path`` is the directory as given."""

    def __init__(self, path: str):
        info = read_recipe_json(path)
        try:
            family = info["family"]
            model_config = config_from_dict(family, info["model"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}/{RECIPE_FILE}: unreadable ({e})") from None
        dense = None
        if info.get("dense_model"):  # for model.name="checkpoint"
            try:
                dense = config_from_dict(family, info["dense_model"])
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}/{RECIPE_FILE}: dense_model: {e}") from None
        self._tensors = OrbaxCheckpoint(os.path.join(path, CHECKPOINT_DIR))
        source = info.get("source")
        super().__init__(
            path,
            "upcycled",
            step=self._tensors.step,
            dense_step=source.get("step") if isinstance(source, dict) else None,
            is_upcycled=True,
            config=dense,
            model_config=model_config,
            family=family,
            info=info,
        )

    def keys(self) -> list[str]:
        return self._tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def read(self, key: str) -> np.ndarray:
        return self._tensors.read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors.shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._tensors.dtype(key)

    def optimizer_state_keys(self) -> list[str]:
        return self._tensors.optimizer_state_keys()

    def read_optimizer_state(self, key: str) -> np.ndarray:
        return self._tensors.read_optimizer_state(key)


# --------------------------------------------------------------------------------------------
# hf_source/: what an HF source carries besides the tensors we keep.
# --------------------------------------------------------------------------------------------


def is_side_file(directory: str, name: str) -> bool:
    """Whether ``directory/name`` goes along with an HF model's weights (config, tokenizer,
    generation config…): a file, not weights, an index or the model card, at most 200 MiB."""
    path = os.path.join(directory, name)
    return (
        os.path.isfile(path)
        and not _NOT_SIDE_FILES.fullmatch(name)
        and os.path.getsize(path) <= _SIDE_FILE_MAX_BYTES
    )


def _extras_from_hf(family: str | None):
    """The family's HF map's ``extras_from_hf`` (the HF tensors our layout folds or drops:
    ViT's class-token position and pooler), or None when it keeps none."""
    if family is None or models.get(family).HF_MAP is None:
        return None
    return getattr(models.hf_map(family), "extras_from_hf", None)


def save_hf_source(checkpoint: HFCheckpoint, dst_dir: str) -> None:
    """Copy an HF checkpoint's side files (config, tokenizer, generation config…) and the
    tensors our layout folds or drops into ``dst_dir/hf_source``."""
    src_dir = checkpoint.path
    names = [name for name in sorted(os.listdir(src_dir)) if is_side_file(src_dir, name)]
    root = source_root(src_dir)
    for name in names:  # all checked before any is copied (by value: symlinks followed)
        path = os.path.join(src_dir, name)
        contained(path, root, path)
    out = os.path.join(dst_dir, HF_SOURCE_DIR)
    os.makedirs(out, exist_ok=True)
    for name in names:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(out, name))
    extras_from_hf = _extras_from_hf(checkpoint.family)
    extras = {} if extras_from_hf is None else extras_from_hf(checkpoint.tensors)
    if extras:
        save_file(extras, os.path.join(out, EXTRAS_FILE), metadata={"format": "pt"})


def read_hf_side(hf_dir: str | None) -> tuple[dict | None, dict[str, np.ndarray]]:
    """(``config.json`` dict, extra tensors) of an ``hf_source/`` directory or of an HF
    directory read directly; (None, {}) without one."""
    if hf_dir is None:
        return None, {}
    # export copies this directory's files (side files, or all of hf_source/) by value
    check_entries(hf_dir, source_root(hf_dir), recursive=True)
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            base = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(base, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    path = os.path.join(hf_dir, EXTRAS_FILE)
    if os.path.isfile(path):
        return base, load_file(path)
    # an HF directory read directly
    extras_from_hf = _extras_from_hf(models.for_hf_model_type(base.get("model_type")))
    return base, {} if extras_from_hf is None else extras_from_hf(LazySafetensors(hf_dir))
