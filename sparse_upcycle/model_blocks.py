"""A config's ``model`` block -> the family's dense and MoE model configs (``model_configs``),
checked field by field against the family's ``Config`` and ``MoeConfig`` (one line naming the
field, as ``config.py`` does for the rest of a config)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from sparse_upcycle import models
from sparse_upcycle.config import MODEL_FIELDS, RUN_FIELDS, ConfigError, check_names
from sparse_upcycle.models import remat
from sparse_upcycle.models.moe_config import MoeConfig


def _plain(value: Any) -> Any:
    """``value`` with its ``ConfigDict``s as dicts and lists as tuples (any type a config holds)."""
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(value)
    return value


PARAM_DTYPES = ("float32", "bfloat16")


def param_dtype(model) -> str:
    """``model.param_dtype`` (default ``"float32"``): the dtype the train state holds the
    parameters in; ConfigError naming the field and the choices otherwise."""
    value = model.get("param_dtype", "float32")
    if value not in PARAM_DTYPES:
        raise ConfigError(
            f"model.param_dtype must be one of {', '.join(PARAM_DTYPES)}; got {value!r}"
        )
    return value


def moe_config(base: MoeConfig, block, where: str = "model.moe", **forced) -> MoeConfig:
    """``base`` (the family's default for that stack) with the config's fields (the block
    ``where``) applied."""
    values = _plain(block) if block is not None else {}
    check_names(values, [f.name for f in dataclasses.fields(MoeConfig)], where)
    try:
        return dataclasses.replace(base, **{**values, **forced})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"moe config: {e}") from None


def model_configs(model, num_experts: int, base=None, granularity: int = 1, shared: int = 0):
    """(family, dense config, MoE config) for a config's ``model`` block.

    ``base`` is a family config to start from (e.g. the one a Hugging Face checkpoint carries)
    when ``model.name == "checkpoint"``. The MoE config gets ``num_experts`` (the recipe's
    total); the dense one none. ``granularity`` G > 1 makes the experts f/G wide (virtual
    groups); ``shared`` S > 0 adds S shared experts of that width (fine_grained_shared).
    ``model.remat`` (``models/remat.py``; default ``"none"``, also for a
    checkpoint's config) and ``model.scan_layers`` (``models/scan.py``; default False) set
    both configs' fields of those names; they are set there only, not in ``model.overrides``.
    ``model.param_dtype`` is checked here (``param_dtype``) and read by ``training.py``."""
    family = model.get("family")
    try:
        module = models.get(family)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    overrides = _plain(model.get("overrides", ml_collections.ConfigDict()))
    moe_keys = module.MOE_FIELDS
    # A t5 model has no `moe` block (nor vit/decoder an `encoder_moe`): refused, not ignored.
    check_names(model, (*MODEL_FIELDS, *moe_keys), "model")
    for name in RUN_FIELDS:
        if name in overrides:
            raise ConfigError(f"model.overrides.{name}: set model.{name} instead")
    try:  # a run's setting, never a checkpoint's: absent means "none"
        remat_policy = remat.check(model.get("remat", "none"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    scan_layers = model.get("scan_layers", False)
    if not isinstance(scan_layers, bool):
        raise ConfigError(f"model.scan_layers must be true or false; got {scan_layers!r}")
    param_dtype(model)
    try:
        if model.get("name") == "checkpoint":
            if base is None:
                raise ConfigError("model.name='checkpoint' needs a Hugging Face source")
            start = base
        else:
            start = module.config(model.name)
        fields = [f.name for f in dataclasses.fields(start) if f.init]
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"model {family}/{model.get('name')}: {e}") from None
    check_names(overrides, fields, "model.overrides")
    # A family registered without a `remat` (`scan_layers`) field (a plugin's) runs without.
    forced: dict[str, Any] = {}
    for name, value, off in (("remat", remat_policy, "none"), ("scan_layers", scan_layers, False)):
        if name in fields:
            forced[name] = value
        elif value != off:
            raise ConfigError(
                f"model.{name}={value!r}: the {family} family's Config has no {name} field"
            )
    try:
        if model.get("name") == "checkpoint":
            start = dataclasses.replace(start, **overrides, **forced)  # start is base here
        else:
            start = module.config(model.name, **overrides, **forced)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"model {family}/{model.get('name')}: {e}") from None

    width = getattr(start, module.MLP_WIDTH_FIELD)
    if width % granularity:
        raise ConfigError(
            f"virtual groups need f % G == 0; the dense hidden width f={width} is not divisible "
            f"by G={granularity}"
        )
    fine = {"expert_mlp_dim": width // granularity} if granularity > 1 else {}
    if shared:  # fine_grained_shared: S shared experts of the routed experts' width f/G
        fine.update(num_shared_experts=shared, shared_expert_mlp_dim=width // granularity)

    def with_moe(n):
        blocks = {
            k: moe_config(
                getattr(start, k), model.get(k), f"model.{k}", num_experts=n, **(fine if n else {})
            )
            for k in moe_keys
        }
        return dataclasses.replace(start, **blocks)

    try:
        return family, with_moe(0), with_moe(num_experts)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {family}: {e}") from None
