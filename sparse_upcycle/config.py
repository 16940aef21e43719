"""Experiment configs: big_vision-style ``get_config(arg)`` Python files + ``--config.x=y``.

A config file defines ``get_config(arg: str | None) -> ml_collections.ConfigDict`` with a
``model`` block (``family``: t5 | vit | decoder; ``name``: a named size of that family, or
``"checkpoint"`` to take the architecture from a Hugging Face source; ``overrides``: fields
of the family's config; ``moe`` (vit, decoder) or ``encoder_moe``/``decoder_moe`` (t5):
``MoeConfig`` fields) and an ``upcycle`` block (``Recipe`` fields). ``--config.a.b=v`` sets a
field after loading; ``v`` is parsed as a Python literal when it is one, else kept as a
string (always a string for a string field).

Configs refuse what they do not know. A file lists only what differs from the command's
defaults (``load_config(schema=...)``: ``"run"`` is ``defaults.default_config()`` plus an
``upcycle`` recipe, ``"compare"`` is ``defaults.default_compare_config()``); a field of the
file or of an override that names no field of those defaults, or a value of another type
than the default's (a ``None`` default takes any value), stops loading with one line naming
it and the closest known names. Sections whose fields depend on something else are checked
by the builder that reads them, with the same message: ``model.overrides`` (the family's
config, ``model_configs``), ``model.moe``/``encoder_moe``/``decoder_moe`` (``moe_config``),
``data`` (the pipeline ``data.name`` picks, ``data.make_pipeline``); compare's arm
``overrides`` (``compare._merge``). The defaults are never merged into the loaded config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence

import ml_collections

from sparse_upcycle import models
from sparse_upcycle.defaults import default_compare_config, default_config
from sparse_upcycle.optim import OPTIMIZERS, default_optimizer_config
from sparse_upcycle.upcycle.recipe import Recipe


class ConfigError(ValueError):
    """A config file, argument or override is wrong; the CLI prints it and exits 2."""


def load_config(
    spec: str, overrides: Sequence[str] = (), schema: str = "run"
) -> ml_collections.ConfigDict:
    """The config ``spec`` (``PATH.py[:arg]``) with ``overrides`` applied, checked against the
    ``schema`` (``"run"``: train/upcycle/verify/export, ``"compare"``) defaults."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {sorted(SCHEMAS)}, got {schema!r}")
    if path.endswith(".json") and not arg:  # a run's config as compare records it
        try:
            with open(path) as f:
                loaded = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a JSON config ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a JSON config is an object of sections")
        return _checked(path, ml_collections.ConfigDict(loaded), overrides, schema)
    module_spec = importlib.util.spec_from_file_location("_sparse_upcycle_config", path)
    if module_spec is None or module_spec.loader is None:  # a name without a ``.py`` suffix
        raise ConfigError(f"{path}: cannot load (not a Python source file)")
    module = importlib.util.module_from_spec(module_spec)
    # The config's own directory is importable while it loads, so configs can share a helper
    # module next to them (``from _t5_common import …``), as big_vision's configs do.
    directory = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, directory)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
    finally:
        sys.path.remove(directory)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except Exception as e:
        called = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"{path}: {called} failed ({type(e).__name__}: {e})") from None
    if type(config) is dict:  # a plain dict of sections is taken as the ConfigDict it spells
        config = ml_collections.ConfigDict(config)
    return _checked(path, config, overrides, schema)


def _checked(path: str, config, overrides: Sequence[str], schema: str):
    known = SCHEMAS[schema]()
    try:
        check(config, known, "config")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for item in overrides:
        apply_override(config, item, known)
    check_finite(config, "config")
    return config


def check_finite(value, where: str) -> None:
    """Refuse a non-finite float (nan, inf, an overflowing literal such as ``1e999``)
    anywhere in ``value`` (called ``where``): no setting of ours means anything at infinity."""
    if isinstance(value, (dict, ml_collections.ConfigDict)):
        for name, item in value.items():
            check_finite(item, f"{where}.{name}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(item, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")


_NON_FINITE = ("nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")


# What ``train`` reads from a run config without a default of its own (a file that lists only
# an upcycle recipe, like configs/upcycle_tiny.py, is not a training config).
TRAIN_FIELDS = ("model", "data", "optimizer", "total_steps")


def check_command(config: ml_collections.ConfigDict, command: str, where: str = "config") -> None:
    """Refuse, before anything is written, a config ``command`` (``train`` | ``compare``)
    cannot run: a missing section, an impossible setting (a negative learning rate,
    ``total_steps <= 0``), or a batch the data-parallel devices do not divide. ``upcycle`` and
    ``verify`` need ``model`` and ``upcycle`` sections, ``export`` a ``model`` one."""
    if command in ("upcycle", "verify", "export"):
        needed = ("model",) if command == "export" else ("model", "upcycle")
        missing = [f"{where}.{name}" for name in needed if not _is_section(config.get(name))]
        if missing:
            raise ConfigError(
                f"{command} needs {' and '.join(missing)} and this config has none (it "
                f"defines {', '.join(sorted(config.keys())) or 'nothing'}); start from "
                "configs/upcycle_tiny.py or sparse_upcycle.defaults.default_config()"
            )
        return
    if command == "compare":
        for name in ("train", "upcycle"):
            if name not in config:
                raise ConfigError(f"compare needs {where}.{name}; this config has none")
        check_command(config.train, "train-section", f"{where}.train")
        if "optimizer" in config.get("pretrain", {}):
            _check_optimizer(config.pretrain.optimizer, f"{where}.pretrain.optimizer")
        return
    missing = [f"{where}.{f}" for f in TRAIN_FIELDS if f not in config]
    if command == "train-section":  # compare's shared train section: steps come per arm
        missing = [m for m in missing if not m.endswith(".total_steps")]
    if missing:
        raise ConfigError(
            f"train needs {', '.join(missing)} and this config has none (it defines "
            f"{', '.join(sorted(config.keys())) or 'nothing'}); start from "
            "sparse_upcycle.train.default_config()"
        )
    if "total_steps" in config:
        steps = config.total_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"{where}.total_steps must be an int >= 1, got {steps!r}")
    _check_optimizer(config.optimizer, f"{where}.optimizer")
    _check_batch(config, where)


def _check_optimizer(block, where: str) -> None:
    from sparse_upcycle.optim import check_optimizer_config

    try:
        check_optimizer_config(block)
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg.replace("optimizer.", f"{where}.", 1) if where else msg) from None


def _check_batch(config, where: str) -> None:
    """The global batch is split over the ``data`` x ``fsdp`` x ``expert`` mesh axes
    (sharding.py); ``mesh.shard_params_over_data`` must be a bool."""
    import jax

    mesh = config.get("mesh", ml_collections.ConfigDict())
    over_data = mesh.get("shard_params_over_data", False) if _is_section(mesh) else False
    if not isinstance(over_data, bool):
        raise ConfigError(
            f"{where}.mesh.shard_params_over_data must be True or False, got {over_data!r}"
        )
    batch = config.data.get("batch_size") if _is_section(config.data) else None
    sizes = [mesh.get(a, -1 if a == "data" else 1) for a in ("data", "fsdp", "expert", "model")]
    if not isinstance(batch, int) or not all(isinstance(s, int) for s in sizes):
        return  # the pipeline and make_mesh name those
    if batch < 1:
        raise ConfigError(f"{where}.data.batch_size must be >= 1, got {batch}")
    dist = config.get("distributed", ml_collections.ConfigDict())
    if _is_section(dist) and dist.get("num_processes", 1) != 1:
        return  # the global device count is known only after jax.distributed.initialize
    n = jax.device_count()
    fixed = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or fixed < 1 or (-1 in sizes and n % fixed):
        return  # make_mesh's message
    data, fsdp, expert, _ = (n // fixed if s == -1 else s for s in sizes)
    parallel = data * fsdp * expert  # shard_params_over_data moves data into fsdp: same count
    if batch % parallel:
        axes = f"data={data} x fsdp={fsdp}" if fsdp != 1 else f"data={data}"
        raise ConfigError(
            f"{where}.data.batch_size={batch} must be divisible by the {parallel} data-parallel "
            f"devices (mesh {axes} x expert={expert} of {n} devices); use a multiple of "
            f"{parallel} or set {where}.mesh"
        )


def apply_override(config: ml_collections.ConfigDict, item: str, schema=None) -> None:
    """Apply one ``config.a.b=value`` (the leading ``--`` already stripped or not).

    With a ``schema`` (``SCHEMAS[...]()``), a field it does not know or a value of the wrong
    type is refused; a field it knows that the file does not list is added (with the sections
    on its way)."""
    item = item.removeprefix("--")
    key, sep, raw = item.partition("=")
    if not sep or not key.startswith("config."):
        raise ConfigError(f"override {item!r}: expected --config.<field>=<value>")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        # nan/inf are not literals: read them as the float they spell, refused as non-finite
        value = float(raw) if raw.strip().lower() in _NON_FINITE else raw
    *parents, leaf = key.split(".")[1:]
    field, where = schema, "config"
    if schema is not None:  # first: a name it does not know is the clearest message
        for name in [*parents, leaf]:
            field = _child(field, name, where)
            where = f"{where}.{name}"
    node = config
    for name in parents:
        if name not in node:
            if schema is None:
                raise ConfigError(f"override {item!r}: no field {name!r}")
            node = None
            break
        node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"override {item!r}: {name!r} is not a section")
    current = node.get(leaf) if node is not None and leaf in node else None
    str_field = isinstance(current, str) or (schema is not None and _is_str_field(field))
    if str_field and not isinstance(value, str):
        value = raw  # e.g. moe.layers: "every_other" in the file, "[1, 3]" given
    if schema is not None:
        check(value, field, where)
    # Sections the schema knows that the file does not list are created on the way.
    node = config
    for name in parents:
        if name not in node:
            with node.unlocked():
                node[name] = ml_collections.ConfigDict()
        node = node[name]
    try:
        if leaf in node:
            node[leaf] = value
        else:
            with node.unlocked():
                node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"override {item!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# What a config may hold: schemas, built from the commands' defaults.
# --------------------------------------------------------------------------------------------


class _Open:
    """A section whose fields the builder that reads it checks (they depend on other fields:
    the model family, ``data.name``)."""

    def __repr__(self) -> str:
        return "OPEN"


OPEN = _Open()
_ANY = object()  # a field inside an open section: any value


@dataclasses.dataclass(frozen=True)
class Each:
    """Sections under free names (compare's ``arms``), each one following ``item``."""

    item: dict


@dataclasses.dataclass(frozen=True)
class OrNone:
    """A field of ``default``'s type that may also be ``None`` (e.g. "off")."""

    default: object


# The fields of a ``model`` block besides each family's MoE blocks; RUN_FIELDS are a run's
# settings, never a checkpoint's, so never in ``model.overrides`` (``model_blocks.py``).
MODEL_FIELDS = ("family", "name", "remat", "scan_layers", "param_dtype", "overrides")
RUN_FIELDS = ("remat", "scan_layers", "param_dtype")


def model_fields() -> tuple[str, ...]:
    """The fields a ``model`` block may have: ``MODEL_FIELDS`` and every registered family's
    MoE blocks (``moe``, ``encoder_moe``, ...; ``model_configs`` refuses another family's)."""
    moe = dict.fromkeys(f for name in models.names() for f in models.get(name).MOE_FIELDS)
    return (*MODEL_FIELDS, *moe)


def _defaults(tree) -> dict:
    """A ConfigDict of defaults as a schema: sections -> dicts, fields -> their default."""
    return {
        k: _defaults(v) if isinstance(v, ml_collections.ConfigDict) else v for k, v in tree.items()
    }


def optimizer_schema() -> dict:
    """The fields of an ``optimizer`` block (every optimizer has the same fields)."""
    blocks = [default_optimizer_config(name) for name in OPTIMIZERS]
    out = {}
    for key, value in blocks[0].items():
        # None for one optimizer (decay_steps, momentum): any value; "0 or None = off" for
        # the clipping thresholds (optim.py's docstring).
        if any(b[key] is None for b in blocks):
            out[key] = None
        elif key in ("clipping_threshold", "clip_grad_norm"):
            out[key] = OrNone(value)
        else:
            out[key] = value
    return out


def run_schema() -> dict:
    """What a train/upcycle/verify/export config may hold: ``defaults.default_config()`` and an
    ``upcycle`` recipe."""
    out = _defaults(default_config())
    out["model"] = {
        "family": "",
        "name": "",
        "remat": "none",
        "scan_layers": False,
        "param_dtype": "float32",
        **dict.fromkeys(model_fields()[len(MODEL_FIELDS) - 1 :], OPEN),
    }
    out["data"] = OPEN
    out["optimizer"] = optimizer_schema()
    out["upcycle"] = {f.name: f.default for f in dataclasses.fields(Recipe)}
    return out


def compare_schema() -> dict:
    """What a ``compare`` config may hold: ``defaults.default_compare_config()``, its ``train``
    section a run config, each arm a ``kind``, run-config ``overrides`` and the arms it is
    also judged ``against``."""
    run = run_schema()
    out = _defaults(default_compare_config())
    out["train"] = run
    out["pretrain"]["optimizer"] = run["optimizer"]
    out["upcycle"] = run["upcycle"]
    out["arms"] = Each(
        {"kind": "", "overrides": run, "branches": Each(run), "branch_compute": 0.5, "against": []}
    )
    return out


SCHEMAS = {"run": run_schema, "compare": compare_schema}


def unknown_field(where: str, name: str, known) -> str:
    """``unknown field a.nmae; did you mean a.name?`` (``where``: the section, ``a``), or the
    section's fields when no name is close."""
    known = sorted(known)
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(name, known)
    if close:
        names = [prefix + c for c in close]
        either = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        hint = f"did you mean {either}?"
    else:
        hint = f"known fields of {where or 'it'}: {', '.join(known) or 'none'}"
    return f"unknown field {prefix}{name}; {hint}"


def check_names(block, known, where: str) -> None:
    """Refuse the first name of ``block`` (a mapping) that is not in ``known``."""
    known = set(known)
    for name in sorted(block.keys()):
        if name not in known:
            raise ConfigError(unknown_field(where, name, known))


def _is_section(value) -> bool:
    return isinstance(value, (dict, ml_collections.ConfigDict))


def _is_str_field(field) -> bool:
    return isinstance(field.default if isinstance(field, OrNone) else field, str)


def _child(field, name: str, where: str):
    """The schema of field ``name`` of section ``field`` (called ``where``)."""
    if field is _ANY or isinstance(field, _Open):
        return _ANY
    if isinstance(field, Each):
        return field.item
    if isinstance(field, dict):
        if name not in field:
            raise ConfigError(unknown_field(where, name, field))
        return field[name]
    raise ConfigError(f"{where} is a field, not a section: {where}.{name} does not exist")


def _expected(default) -> str | None:
    """What a value must be to replace ``default`` (None: anything)."""
    if default is None or default is _ANY:
        return None
    if isinstance(default, OrNone):
        return f"{_expected(default.default)} or None"
    if isinstance(default, bool):
        return "a bool"
    if isinstance(default, int):
        return "an int"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (list, tuple)):
        return "a list"
    return f"a {type(default).__name__}"


def _accepts(default, value) -> bool:
    if default is None or default is _ANY:
        return True
    if isinstance(default, OrNone):
        return value is None or _accepts(default.default, value)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)) and isinstance(value, bool):
        return False
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _shown(value) -> str:
    text = repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def check(value, field, where: str, types: bool = True) -> None:
    """Refuse, in ``value`` (called ``where``, e.g. ``config``), a field the schema ``field``
    does not know and (``types``) a value of another type than its default's."""
    if isinstance(field, (dict, _Open, Each)):
        if not _is_section(value):
            if types:
                raise ConfigError(
                    f"{where} must be a section (dict), got {_shown(value)} "
                    f"({type(value).__name__})"
                )
            return
        if isinstance(field, _Open):
            return
        for name, item in value.items():
            check(item, _child(field, name, where), f"{where}.{name}", types)
    elif types and not _accepts(field, value):
        raise ConfigError(
            f"{where} must be {_expected(field)}, got {_shown(value)} ({type(value).__name__})"
        )
