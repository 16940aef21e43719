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

from sparse_upcycle import models
from sparse_upcycle.upcycle import methods


@dataclasses.dataclass(frozen=True)
class Verdict:
    preserves: bool
    reasons: tuple[str, ...] = ()  # why not; empty when it preserves

    def __str__(self) -> str:
        return "True" if self.preserves else f"False ({'; '.join(self.reasons)})"


moe_blocks = models.moe_blocks  # the MoE blocks of a model config, by field name


def identical_sources(listed) -> bool:
    """Whether the sources of a recipe.json's ``sources`` (each with the ``sha256`` of its
    files) hold the same bytes, so that their experts are copies of one dense MLP."""
    digests = [sorted(s.get("sha256", {}).items()) for s in listed or ()]
    return bool(digests) and all(d == digests[0] for d in digests)


def _recipe_problem(recipe, same_sources: bool = False) -> str | None:
    """Why the recipe's experts do not sum to the dense MLP (None when they are meant to)."""
    if len(recipe.sources) > 1 and not same_sources:  # no one dense function to keep
        return f"the experts come from {len(recipe.sources)} different dense sources"
    return methods.get(recipe.method).preserves_dense_function(recipe)


def dense_function_verdict(recipe, moe_model_config, same_sources: bool = False) -> Verdict:
    """Whether the MoE of ``recipe`` with the model config ``moe_model_config`` is meant to
    reproduce the dense function at evaluation, with the reasons when it is not.
    ``same_sources``: the recipe's several sources hold identical files
    (``identical_sources``)."""
    reasons = [r for r in [_recipe_problem(recipe, same_sources)] if r]
    for name, block in moe_blocks(moe_model_config).items():
        problem = block.eval_routing_problem()
        if problem:
            reasons.append(f"{name}: {problem}")
    return Verdict(not reasons, tuple(reasons))
