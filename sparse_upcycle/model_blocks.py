"""A config's ``model`` block -> the family's dense and MoE model configs (``model_configs``),
checked field by field against the family's ``Config`` and ``MoeConfig`` (one line naming the
field, as ``config.py`` does for the rest of a config)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from sparse_upcycle import models
from sparse_upcycle.config import ConfigError, check_names
from sparse_upcycle.models import remat
from sparse_upcycle.models.moe_config import MoeConfig


def _plain(value: Any) -> Any:
    """``value`` with its ``ConfigDict``s as dicts and lists as tuples (any type a config holds)."""
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(value)
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


def model_configs(model, num_experts: int, base=None, granularity: int = 1):
    """(family, dense config, MoE config) for a config's ``model`` block.

    ``base`` is a family config to start from (e.g. the one a Hugging Face checkpoint carries)
    when ``model.name == "checkpoint"``. The MoE config gets ``num_experts`` (the recipe's
    total); the dense one none. ``granularity`` G > 1 makes the experts f/G wide (virtual
    groups). ``model.remat`` (``models/remat.py``; default ``"none"``, also for a
    checkpoint's config) sets both configs' ``remat``; it is set there only, not in
    ``model.overrides``."""
    family = model.get("family")
    try:
        module = models.get(family)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    overrides = _plain(model.get("overrides", ml_collections.ConfigDict()))
    moe_keys = module.MOE_FIELDS
    # A t5 model has no `moe` block (nor vit/decoder an `encoder_moe`): refused, not ignored.
    check_names(model, ("family", "name", "remat", "overrides", *moe_keys), "model")
    if "remat" in overrides:
        raise ConfigError("model.overrides.remat: set model.remat instead")
    try:  # a run's setting, never a checkpoint's: absent means "none"
        remat_policy = remat.check(model.get("remat", "none"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    # A family registered without a `remat` field (a plugin's) runs without rematerialisation.
    forced = {"remat": remat_policy} if "remat" in fields else {}
    if not forced and remat_policy != "none":
        raise ConfigError(
            f"model.remat={remat_policy!r}: the {family} family's Config has no remat field"
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
