"""The upcycling recipe: everything that determines an upcycled checkpoint.

``Recipe`` is flat (one field per setting, the same names as the ``upcycle`` config section
and ``recipe.json``). It checks what every recipe shares here and asks the method it names
(``methods.get(recipe.method)``) for the rest: the method's own settings, the expert count,
the display name and whether the MoE is meant to compute the dense function.
"""

from __future__ import annotations

import dataclasses
import math

from sparse_upcycle.upcycle import methods, router_init, sources

# The fields every method shares; each method lists the others it reads (``Method.settings``).
COMMON_SETTINGS = (
    "method",
    "router_init_std",
    "seed",
    "optimizer",
    "step",
    *sources.SETTINGS,
    *router_init.SETTINGS,
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines an upcycled checkpoint (written next to it as recipe.json).

    ``num_experts`` is E for copy/drop and the routed experts of fine_grained_shared; for
    virtual_group E = expansion · granularity. ``k``, ``ordering`` (and for
    fine_grained_shared ``renormalize``) must match the model's top-K router (the scalings
    use them). ``shared_experts`` (S) and ``reinit_ratio`` (Drop-Upcycling's r for the routed
    experts) are fine_grained_shared's. ``optimizer``: "reset" (default; the paper's language
    setting: training starts from a fresh optimizer state) or "tile" (the paper's vision
    setting: the dense moments are copied into every expert, written as ``opt_state`` next to
    the params; ``copy`` only).
    ``step``: "reset" (default; the MoE checkpoint is at step 0) or "keep" (it carries the
    dense step count, so a schedule keyed on the step continues where the dense run stopped)."""

    method: str = "copy"
    num_experts: int = 32
    router_init_std: float = 0.02
    seed: int = 0
    noise_std: float = 0.0  # copy
    expansion: int = 8  # virtual_group: E_x
    granularity: int = 1  # virtual_group: G
    k: int = 2
    ordering: str = "softmax_then_topk"
    renormalize: bool = False  # fine_grained_shared: the model's top-K renormalises
    scaling: str = "paper"  # virtual_group / fine_grained_shared: paper | exact | none
    shared_experts: int = 0  # fine_grained_shared: S
    reinit_ratio: float = 0.0  # fine_grained_shared: r of the routed experts
    drop_ratio: float = 0.5  # drop: r
    drop_stats: str = "matrix"
    drop_units: str = "shared"  # drop: one re-drawn index set per expert, or one per matrix
    optimizer: str = "reset"
    step: str = "reset"
    # Several dense sources (``sources.py``): paths, each expert's source, the base source and
    # how the non-expert parameters are made (base | average, per group), averaging weights.
    sources: tuple[str, ...] = ()
    expert_sources: tuple[int, ...] = ()
    experts_per_source: int = 1
    base_source: int = 0
    non_expert: str = "base"
    source_weights: tuple[float, ...] = ()
    shared_source: int = -1  # copy: one shared expert, a copy of this source's MLP (-1: none)
    # How the fresh router starts (``router_init.py``): random | uniform_random | cheap_embed |
    # hidden | hidden_last, and the prompts of each expert for the last three.
    router_init: str = "random"
    positive_prompts: tuple[tuple[str, ...], ...] = ()
    negative_prompts: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        for name in ("sources", "expert_sources", "source_weights"):  # JSON/ConfigDict lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("positive_prompts", "negative_prompts"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(
                    self, name, tuple(tuple(p) if isinstance(p, list) else p for p in value)
                )
        if self.method not in methods.METHODS:
            raise ValueError(f"recipe method must be one of {methods.names()}, got {self.method!r}")
        if self.optimizer not in ("reset", "tile"):
            raise ValueError(f"recipe optimizer must be reset or tile, got {self.optimizer!r}")
        if self.step not in ("reset", "keep"):
            raise ValueError(f"recipe step must be reset or keep, got {self.step!r}")
        if self.shared_experts < 0:
            raise ValueError(f"upcycle.shared_experts must be >= 0, got {self.shared_experts}")
        if self.num_experts < 1 or self.expansion < 1 or self.granularity < 1 or self.k < 1:
            raise ValueError(
                "num_experts, expansion, granularity and k must all be >= 1; got "
                f"{self.num_experts}, {self.expansion}, {self.granularity}, {self.k}"
            )
        for name in ("router_init_std", "noise_std", "drop_ratio", "reinit_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"upcycle.{name} must be a finite number >= 0, got {value!r}")
        self.method_impl.validate(self)
        sources.validate(self)
        router_init.validate(self)

    @property
    def method_impl(self) -> methods.Method:
        """The registered ``Method`` this recipe names."""
        return methods.get(self.method)

    @property
    def total_experts(self) -> int:
        """E, the number of experts per MoE layer."""
        return self.method_impl.total_experts(self)

    @property
    def name(self) -> str:
        """A short name: the method's, or the papers' notation (virtual groups, e.g. E8G1T2;
        fine-grained + shared experts, e.g. E8S2G4T2)."""
        return self.method_impl.display_name(self)

    @property
    def preserves_dense_function(self) -> bool:
        """Whether the MoE is *meant* to compute the dense function (given a router setting
        that sums each token's weights to one and drops nothing; ``verify`` checks the rest):
        exact copies, or virtual groups with exact scaling and ``topk_then_softmax``, where a
        picked group's G experts share its weight p_r/G, carry G·(shard of the MLP) each and so
        sum to p_r·MLP for any router scores."""
        return self.method_impl.preserves_dense_function(self) is None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
