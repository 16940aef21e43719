"""How a fresh router starts (``Recipe.router_init``), as mergekit-moe's ``gate_mode`` offers.

* ``random`` — N(0, ``router_init_std``²) for every entry (the paper's fresh router;
  mergekit's ``random`` is ``torch.randn``, i.e. ``router_init_std = 1``).
* ``uniform_random`` — U(-1/√d, 1/√d), torch ``nn.Linear``'s default initialisation
  (Kaiming-uniform with a = √5 gives the bound 1/√fan_in), mergekit's ``uniform_random``.
* ``cheap_embed`` — expert e's router row is the sum of the token embeddings of its positive
  prompts, unit-normalised, minus the same of its negative prompts, unit-normalised again; the
  same rows in every MoE layer (mergekit ``router.get_cheap_embedding``).
* ``hidden`` — per MoE layer, expert e's row is the mean over positions and prompts of the
  residual stream entering that layer (the base model's own forward, here our model on the
  base parameters), positives minus negatives, unit-normalised (mergekit ``hidden_avg``).
* ``hidden_last`` — the same with the last position of each prompt (mergekit's ``hidden``).

Prompts (``positive_prompts`` / ``negative_prompts``: one list of strings per expert) are
tokenised with the base source's own ``tokenizer.json`` (the ``tokenizers`` library, with the
special tokens its post-processor adds, e.g. Llama's ``<s>``: mergekit prefixes the BOS
token); nothing is downloaded. With a copied shared expert (``shared_source``) one more list
comes last: its gate vector is made as one more router row (mergekit-moe's Qwen output).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sparse_upcycle.upcycle.recipe import Recipe

SETTINGS = ("router_init", "positive_prompts", "negative_prompts")
MODES = ("random", "uniform_random", "cheap_embed", "hidden", "hidden_last")
PROMPTED = ("cheap_embed", "hidden", "hidden_last")


def validate(recipe: Recipe) -> None:
    """``router_init`` and the prompts it needs (ValueError naming the field)."""
    if recipe.router_init not in MODES:
        raise ValueError(f"upcycle.router_init must be one of {MODES}, got {recipe.router_init!r}")
    for name in ("positive_prompts", "negative_prompts"):
        lists = getattr(recipe, name)
        if not isinstance(lists, (tuple, list)) or not all(
            isinstance(p, (tuple, list)) and all(isinstance(s, str) for s in p) for p in lists
        ):
            raise ValueError(
                f"upcycle.{name} must be one list of strings per expert, got {lists!r}"
            )
    if recipe.router_init != "random" and recipe.method in ("virtual_group", "fine_grained_shared"):
        raise ValueError(
            f"upcycle.router_init={recipe.router_init}: the {recipe.method} router repeats its "
            "columns by design; use router_init=random"
        )
    if recipe.router_init not in PROMPTED:
        if recipe.positive_prompts or recipe.negative_prompts:
            raise ValueError(
                f"upcycle.positive_prompts / negative_prompts need router_init one of {PROMPTED}"
                f" (got router_init={recipe.router_init!r})"
            )
        return
    e = recipe.total_experts + (recipe.shared_source >= 0)  # the shared expert's come last
    if len(recipe.positive_prompts) != e:
        also = " and the shared expert (last)" if recipe.shared_source >= 0 else ""
        raise ValueError(
            f"upcycle.router_init={recipe.router_init} needs positive_prompts for each of the "
            f"{recipe.total_experts} experts{also}; got {len(recipe.positive_prompts)} list(s)"
        )
    empty = [i for i, p in enumerate(recipe.positive_prompts) if not p]
    if empty:
        raise ValueError(
            f"upcycle.positive_prompts[{empty[0]}] is empty: expert {empty[0]} "
            "needs at least one prompt"
        )
    if recipe.negative_prompts and len(recipe.negative_prompts) != e:
        raise ValueError(
            f"upcycle.negative_prompts must be empty or one list per expert ({e}); got "
            f"{len(recipe.negative_prompts)}"
        )


def uniform(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    d = shape[0]
    bound = 1.0 / np.sqrt(d)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def tokenizer_path(source_path: str) -> str:
    """The base source's ``tokenizer.json`` (ValueError when it has none)."""
    path = os.path.join(source_path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"{source_path}: no tokenizer.json; router_init with prompts tokenises them with the "
            "base source's own tokenizer (an HF model directory)"
        )
    return path


def tokenize(path: str, prompts: Sequence[str], vocab_size: int) -> list[np.ndarray]:
    """Each prompt's token ids (the tokenizer's special tokens included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    out = []
    for p in prompts:
        ids = np.asarray(tok.encode(p).ids, np.int32)
        if ids.size == 0:
            raise ValueError(f"prompt {p!r} tokenises to nothing")
        if ids.max() >= vocab_size:
            raise ValueError(
                f"{path}: prompt {p!r} has token id {int(ids.max())}, beyond the model's "
                f"vocabulary of {vocab_size}; is this the source's tokenizer?"
            )
        out.append(ids)
    return out


def router_rows(
    recipe: Recipe,
    prefixes: Sequence[str],
    tokens: Callable[[Sequence[str]], list[np.ndarray]],
    embed: Callable[[], np.ndarray],
    layer_inputs: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None,
) -> dict[str, np.ndarray]:
    """``{MoE layer prefix: router kernel [d, E]}`` for a prompted ``router_init``.

    Args:
      recipe: with ``router_init`` in ``PROMPTED`` and its prompts.
      prefixes: the MoE layers' parameter prefixes (``layers_3/mlp``).
      tokens: prompts -> token ids, one array per prompt.
      embed: the base source's token embedding [V, d].
      layer_inputs: ids [L] -> {prefix: the residual stream entering that layer, [L, d]} (the
        ``hidden`` modes).
    """
    cheap = recipe.router_init == "cheap_embed"
    table = embed() if cheap else None

    def vectors(prompts: Sequence[str]) -> dict[str, np.ndarray]:
        ids = tokens(prompts)
        if cheap:
            assert table is not None
            total = np.zeros(table.shape[1], np.float64)
            for i in ids:
                total += table[i].astype(np.float64).sum(0)
            return dict.fromkeys(prefixes, _unit(total))
        assert layer_inputs is not None
        acc = {p: np.zeros(0) for p in prefixes}
        for one in ids:
            states = layer_inputs(one)
            for p in prefixes:
                h = np.asarray(states[p], np.float64)
                v = h.mean(0) if recipe.router_init == "hidden" else h[-1]
                acc[p] = v if acc[p].size == 0 else acc[p] + v
        return {p: v / len(ids) for p, v in acc.items()}

    rows: dict[str, list[np.ndarray]] = {p: [] for p in prefixes}
    for e, positive in enumerate(recipe.positive_prompts):
        v = vectors(positive)
        negative = recipe.negative_prompts[e] if recipe.negative_prompts else ()
        if negative:
            w = vectors(negative)
            v = {p: v[p] - w[p] for p in prefixes}
        for p in prefixes:
            rows[p].append(_unit(v[p]))
    return {p: np.stack(r, axis=1).astype(np.float32) for p, r in rows.items()}
