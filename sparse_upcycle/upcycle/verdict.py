"""Is an upcycled model *meant* to compute its dense model's function? One answer for
``upcycle`` (printed and written to recipe.json), ``verify`` (which then checks the logits)
and ``export``.

Two things must hold: the recipe builds experts whose weighted sum is the dense MLP
(``Method.preserves_dense_function``: exact copies, or exact virtual-group scaling), and every
MoE layer's evaluation routing gives each token weights that sum to one without dropping it,
whatever the router's scores (``MoeConfig.eval_routing_problem``, which computes the capacity
at the configured group size with ``MoeConfig.capacity``).
"""

from __future__ import annotations

import dataclasses

from sparse_upcycle.models.moe_config import MoeConfig
from sparse_upcycle.upcycle import methods


@dataclasses.dataclass(frozen=True)
class Verdict:
    preserves: bool
    reasons: tuple[str, ...] = ()  # why not; empty when it preserves

    def __str__(self) -> str:
        return "True" if self.preserves else f"False ({'; '.join(self.reasons)})"


def moe_blocks(model_config) -> dict[str, MoeConfig]:
    """The ``MoeConfig`` fields of a model config (``moe``, or ``encoder_moe``/``decoder_moe``)
    that have experts."""
    return {
        f.name: getattr(model_config, f.name)
        for f in dataclasses.fields(model_config)
        if isinstance(getattr(model_config, f.name), MoeConfig)
        and getattr(model_config, f.name).num_experts
    }


def _recipe_problem(recipe) -> str | None:
    """Why the recipe's experts do not sum to the dense MLP (None when they are meant to)."""
    return methods.get(recipe.method).preserves_dense_function(recipe)


def dense_function_verdict(recipe, moe_model_config) -> Verdict:
    """Whether the MoE of ``recipe`` with the model config ``moe_model_config`` is meant to
    reproduce the dense function at evaluation, with the reasons when it is not."""
    reasons = [r for r in [_recipe_problem(recipe)] if r]
    for name, block in moe_blocks(moe_model_config).items():
        problem = block.eval_routing_problem()
        if problem:
            reasons.append(f"{name}: {problem}")
    return Verdict(not reasons, tuple(reasons))
