"""The checkpoint surgeon behind ``sparse-upcycle upcycle`` (``verify`` and ``inspect`` are in
``verify.py``).

``upcycle`` reads a dense checkpoint (T5X, Orbax, big_vision .npz or HF safetensors), builds
the MoE parameters with the recipe's rules (``upcycle/rules.py``) tensor by tensor, and streams
them into an Orbax checkpoint ``{"params": …, "step": …}`` (about 64 MB of output in memory at a
time) plus ``recipe.json`` (recipe, model config,
source, checksums) to a temporary directory that is renamed to ``--dst`` only when complete.
An HF source's config, tokenizer and generation files go to ``hf_source/``
(``checkpoints/layout.py`` describes the output directory).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import warnings

import numpy as np
from tqdm import tqdm

from sparse_upcycle import models
from sparse_upcycle.checkpoints import hf_write
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import HFCheckpoint, parse_size
from sparse_upcycle.checkpoints.layout import (
    CHECKPOINT_DIR,
    RECIPE_FILE,
    checksums,
    read_hf_side,
    save_hf_source,
    write_recipe_json,
)
from sparse_upcycle.checkpoints.open import (
    load_upcycled,  # noqa: F401  (tests, scripts use it here)
    open_dense,
)
from sparse_upcycle.checkpoints.orbax import StreamingWriter
from sparse_upcycle.checkpoints.output import TempOutput
from sparse_upcycle.checkpoints.reader import CheckpointReader
from sparse_upcycle.config import ConfigError
from sparse_upcycle.models import build_model
from sparse_upcycle.sizes import format_bytes
from sparse_upcycle.task import recipe_from, resolve_models
from sparse_upcycle.upcycle import router_init
from sparse_upcycle.upcycle.recipe import Recipe
from sparse_upcycle.upcycle.rules import (
    ROUTER_RE,
    UpcycledTensors,
    tile_optimizer_state,
    upcycle_tree,
)
from sparse_upcycle.upcycle.sources import check_readers
from sparse_upcycle.upcycle.verdict import dense_function_verdict, identical_sources

# --------------------------------------------------------------------------------------------
# upcycle
# --------------------------------------------------------------------------------------------


def upcycle(
    config,
    src: str | None,
    dst: str,
    fmt: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    refuse_non_finite: bool = False,
    hf: HFOutput | None = None,
) -> dict:
    """Write the MoE checkpoint for ``config`` from the dense ``src`` (or the recipe's
    ``upcycle.sources``) to ``dst``; returns the recipe.json content. Nothing is written to
    ``dst`` unless everything succeeded. Source tensors holding NaN/inf are copied with one
    warning naming them, or, with ``refuse_non_finite``, stop the run at the first
    (CheckpointError naming it).

    With ``hf`` the output is a Hugging Face directory instead (what ``export --format hf``
    would make of our output, in one pass: each MoE tensor is computed when the HF writer
    asks for it, one MoE layer's experts in memory, and streamed into its shard), with the
    recipe.json content as ``sparse_upcycle_recipe.json`` beside the weights."""
    paths = _source_paths(config, src)
    base_index = recipe_from(config).base_source if len(paths) > 1 else 0
    also = [(f"upcycle.sources[{i}]", p) for i, p in enumerate(paths) if i != base_index]
    output = TempOutput(
        paths[base_index], dst, kind="upcycle", overwrite=overwrite, also_reads=also
    )
    opened = [open_dense(p, fmt) for p in paths]
    _check_sources(paths, opened)
    source = opened[base_index]
    family, dense_cfg, moe_cfg, recipe = resolve_models(config, source)
    target = models.target_shapes(family, moe_cfg)
    if hf is not None and recipe.optimizer == "tile":
        raise ConfigError(
            "upcycle --output-format hf: a Hugging Face directory holds no optimizer "
            "state; use --config.upcycle.optimizer=reset"
        )
    slot_keys = []
    if recipe.optimizer == "tile":
        slot_keys = source.optimizer_state_keys()
        if not slot_keys:
            raise CheckpointError(
                f"{paths[base_index]}: optimizer=tile needs the dense optimizer state and this "
                f"{source.format} checkpoint holds none; use --config.upcycle.optimizer=reset"
            )
    _warn_schedule(config, recipe, source.step)
    _check_room(target, output.parent, dst)
    # every source's checksums, once, for recipe.json and the verdict: hashed on another
    # thread while the output is built (hashlib and file I/O release the GIL)
    hashing = _hash_sources(paths) if recipe.sources else None

    def write_recipe(directory: str, step: int, slots: int, name: str = RECIPE_FILE) -> dict:
        """recipe.json (or ``name``), once the output is written and the sources hashed."""
        listed = None
        if hashing is not None:
            listed = [
                {"path": os.path.abspath(p), "format": o.format, "step": o.step, "sha256": sha}
                for p, o, sha in zip(paths, opened, hashing.result(), strict=True)
            ]
        verdict = dense_function_verdict(recipe, moe_cfg, identical_sources(listed))
        return write_recipe_json(
            directory,
            recipe=recipe.to_dict(),
            recipe_name=recipe.name,
            family=family,
            model=moe_cfg,
            dense_model=dense_cfg,
            source_path=paths[base_index],
            source_format=source.format,
            source_step=source.step,
            step=step,
            optimizer_slots=slots,
            preserves_dense_function=verdict.preserves,
            preservation=list(verdict.reasons),  # why not, when it does not
            sources=listed,
            source_sha256=listed[base_index]["sha256"] if listed else None,
            name=name,
        )

    rows = _router_rows(recipe, family, dense_cfg, source, target)
    hf_plan = None
    if hf is not None:  # refuse before anything is read or written
        hf_plan = _hf_plan(hf, family, moe_cfg, source)
    if hf_plan is not None:
        with output as tmp:
            non_finite = []
            reads = [_finite_read(o, non_finite, refuse=refuse_non_finite) for o in opened]
            tensors = UpcycledTensors(
                source.keys(),
                reads[base_index],
                target,
                recipe,
                reads if recipe.sources else (),
                rows,
            )
            summary = hf_write.write_hf(
                tmp,
                family=family,
                config=moe_cfg,
                keys=tensors.keys(),
                read=tensors.read,
                progress=progress,
                **hf_plan,
            )
            _warn_non_finite(", ".join(paths), non_finite)
            info = write_recipe(tmp, 0, 0, HF_RECIPE_FILE)
        return {**info, "hf": summary}
    with output as tmp:
        writer = StreamingWriter(os.path.join(tmp, CHECKPOINT_DIR))
        try:
            non_finite: list[str] = []
            reads = [_finite_read(o, non_finite, refuse=refuse_non_finite) for o in opened]
            read = reads[base_index]
            stream = upcycle_tree(
                source.keys(), read, target, recipe, reads if recipe.sources else (), rows
            )
            for path, value in tqdm(
                stream, total=len(target), desc="upcycle", unit="tensor", disable=not progress
            ):
                writer.add(path, value)
            slots = tile_optimizer_state(slot_keys, source.read_optimizer_state, target, recipe)
            for path, value in tqdm(
                slots, total=len(slot_keys), desc="optimizer", unit="slot", disable=not progress
            ):
                writer.add(path, value, item="opt_state")
            step = source.step if recipe.step == "keep" and source.step is not None else 0
            writer.close(step=step)
            _warn_non_finite(", ".join(paths), non_finite)
        except BaseException:
            writer.abort()
            raise
        info = write_recipe(tmp, step, len(slot_keys))
        if isinstance(source, HFCheckpoint):  # config, tokenizer, … for `export --format hf`
            save_hf_source(source, tmp)
    return info


@dataclasses.dataclass(frozen=True)
class HFOutput:
    """``upcycle --output-format hf``'s options, as ``export``'s of the same names."""

    dtype: str = "auto"
    moe_layout: str = "fused"
    max_shard_size: str = "5GB"
    dropless: bool = False


HF_RECIPE_FILE = "sparse_upcycle_recipe.json"  # recipe.json would mark our own layout


def _hf_plan(hf: HFOutput, family: str, moe_cfg, source: CheckpointReader) -> dict:
    """``hf_write.write_hf``'s settings for the MoE model, checked (the HF class exists and
    computes what ours does; dtype, layout, shard size valid) before anything is written."""
    hf_write.check_moe_layout(hf.moe_layout)
    try:
        max_bytes = parse_size(hf.max_shard_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    side_dir = source.path if isinstance(source, HFCheckpoint) else None
    base, extras = read_hf_side(side_dir)
    return {
        "hf_config": hf_write.hf_config(family, moe_cfg, base, hf.dropless, "the MoE model"),
        "dtype": hf_write.target_dtype(hf.dtype, base),
        "moe_layout": hf.moe_layout,
        "max_bytes": max_bytes,
        "extras": extras,
        "side_dir": side_dir,
    }


def _hash_sources(paths: list[str]):
    """A future of ``[checksums(p) for p in paths]`` (each distinct path hashed once), computed
    on a thread of its own."""
    from concurrent.futures import ThreadPoolExecutor

    def run():
        done: dict[str, dict] = {}
        for p in paths:
            real = os.path.realpath(p)
            if real not in done:
                done[real] = checksums(p)
        return [done[os.path.realpath(p)] for p in paths]

    pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def _router_rows(recipe, family, dense_cfg, source, target) -> dict | None:
    """Each MoE layer's router kernel for a prompted ``router_init`` (``router_init.py``):
    the prompts tokenised with the base source's tokenizer.json, then the base model's token
    embeddings (``cheap_embed``) or our model's forward on the base parameters (``hidden``)."""
    if recipe.router_init not in router_init.PROMPTED:
        return None
    module = models.get(family)
    embedding = getattr(module, "EMBEDDING", None)
    if embedding is None or not hasattr(module.Model, "layer_inputs"):
        raise ConfigError(
            f"upcycle.router_init={recipe.router_init} needs a decoder-only model; the {family} "
            "family has no prompt forward; use router_init=random"
        )
    try:
        tokenizer = router_init.tokenizer_path(source.path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    vocab = source.shape(embedding)[0]
    prefixes = sorted({m["prefix"] for p in target if (m := ROUTER_RE.match(p))})
    model = None
    if recipe.router_init != "cheap_embed":  # the base model, once, in float32
        params = {k: source.read(k) for k in source.keys()}
        model = build_model(family, models.in_float32(dense_cfg), params)
        del params

    def layer_inputs(ids):
        assert model is not None
        states = model.layer_inputs(np.asarray(ids)[None])
        return {p: np.asarray(states[p][0]) for p in prefixes}

    try:
        return router_init.router_rows(
            recipe,
            prefixes,
            lambda prompts: router_init.tokenize(tokenizer, prompts, vocab),
            lambda: source.read(embedding),
            layer_inputs if model is not None else None,
        )
    except ValueError as e:
        raise ConfigError(f"upcycle.router_init={recipe.router_init}: {e}") from None


def _source_paths(config, src: str | None) -> list[str]:
    """The dense checkpoints to read: ``--src``, or the recipe's ``upcycle.sources``."""
    listed = list(recipe_from(config).sources)
    if listed and src:
        raise ConfigError(
            "--src and upcycle.sources both name dense sources; give them in one place "
            "(with several sources, in upcycle.sources)"
        )
    if listed:
        return listed
    if not src:
        raise ConfigError("no dense source: pass --src DIR or set upcycle.sources")
    return [src]


def _check_sources(paths: list[str], opened: list[CheckpointReader]) -> None:
    """Several sources must be one architecture: paths, shapes and model configs are compared
    before any tensor is read."""
    if len(opened) < 2:
        return
    try:
        check_readers(paths, opened)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _check_room(target: dict, parent: str, dst: str) -> None:
    """Before anything is written: the MoE's largest tensor must fit in this machine's memory
    and the whole checkpoint (its tensors, in the model's dtypes, as written) on ``--dst``'s
    disk; Orbax's metadata comes on top, so a refusal is certain, not a guess."""
    sizes = {p: math.prod(shape) * np.dtype(dtype).itemsize for p, (shape, dtype) in target.items()}
    biggest = max(sizes, key=sizes.__getitem__, default=None)
    if biggest is None:
        return
    total = sum(sizes.values())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = None
    if memory and sizes[biggest] > memory:
        raise ConfigError(
            f"the MoE's tensor {biggest} {target[biggest][0]} alone needs at least "
            f"{format_bytes(sizes[biggest])}, more than this machine's memory "
            f"({format_bytes(memory)}); check config.upcycle.num_experts and the model sizes"
        )
    probe = parent
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    if probe:
        free = shutil.disk_usage(probe).free
        if total > free:
            raise CheckpointError(
                f"--dst {dst}: the MoE checkpoint needs at least {format_bytes(total)} and the "
                f"disk there has {format_bytes(free)} free; free space or choose another --dst"
            )


def _finite_read(source: CheckpointReader, non_finite: list[str], refuse: bool = False):
    """``source.read`` that records the names of tensors holding NaN or inf (or, ``refuse``,
    raises CheckpointError at the first)."""

    def read(key: str) -> np.ndarray:
        value = source.read(key)
        if np.issubdtype(value.dtype, np.inexact) and key not in non_finite:
            if not np.isfinite(value).all():
                if refuse:
                    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
                    raise CheckpointError(
                        f"{source.path}: tensor {key} holds {bad} NaN/inf value(s) of "
                        f"{np.size(value)} (--refuse-non-finite); repair the source or drop "
                        "the flag to copy it as it is"
                    )
                non_finite.append(key)
        return value

    return read


def _warn_non_finite(src: str, names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        warnings.warn(
            f"{src}: {len(names)} source tensor(s) hold NaN/inf, copied as they are: {shown}",
            stacklevel=2,
        )


def _warn_schedule(config, recipe: Recipe, dense_step: int | None) -> None:
    """``step=keep`` with an rsqrt schedule resumes it at the dense step count, where the rate
    is already base/sqrt(step); a ``step_offset`` on top would count the dense steps twice."""
    schedule = config.get("optimizer", {}).get("schedule") if "optimizer" in config else None
    if recipe.step == "keep" and schedule == "rsqrt":
        offset = config.optimizer.get("step_offset", 0)
        warnings.warn(
            f"upcycle step=keep with an rsqrt schedule: training resumes it at the dense step "
            f"{dense_step} (lr = base/sqrt({dense_step}))"
            + (f" and optimizer.step_offset={offset} adds to that" if offset else "")
            + "; use step=reset with optimizer.step_offset to choose where it continues",
            stacklevel=2,
        )
