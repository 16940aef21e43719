"""Optimizers and learning-rate schedules from one ``optimizer`` config block.

``make_optimizer(cfg) -> (tx, schedule)`` builds an optax transformation; ``schedule(step)`` is the
learning rate it uses at training step ``step`` (0 for the first update), for logging.
``default_optimizer_config(name)`` lists every field; a config gives only the fields it changes.

Fields (default for ``adafactor`` / ``adamw`` where they differ):

* ``name`` — ``"adafactor"`` | ``"adamw"``.
* ``learning_rate`` (1.0 / 1e-3) — peak rate (cosine, linear, constant) or base rate (rsqrt).
* ``schedule`` (``"rsqrt"`` / ``"cosine"``) — ``rsqrt`` | ``cosine`` | ``linear`` | ``constant``.
* ``warmup_steps`` (10_000 / 1_000) — rsqrt: length of the plateau; others: linear warmup from 0.
* ``step_offset`` (0) — added to the step: the dense steps already taken (continue the dense
  schedule after upcycling) or 0 (restart it).
* ``decay_steps`` (None / 100_000) — cosine, linear: the offset step at which the end rate is
  reached, warmup included.
* ``end_learning_rate_factor`` (0.0) — cosine, linear: end rate as a fraction of the peak.
* ``weight_decay`` (0.0 / 1e-4) — decoupled; never on biases, norm scales or 1-D params (below).
* ``b1``, ``b2``, ``eps`` (0.9, 0.999, 1e-8) — AdamW moment decays and denominator epsilon.
* ``decay_rate`` (0.8) — Adafactor second-moment decay ``beta2_t = 1 - (t+1)^-decay_rate``.
* ``clipping_threshold`` (1.0) — Adafactor update clipping ``d`` (None = off).
* ``multiply_by_parameter_scale`` (True) — Adafactor relative step ``lr * max(1e-3, RMS(param))``.
* ``factored`` (True), ``min_dim_size_to_factor`` (128) — Adafactor factored second moments, for
  params with two dims of at least that size.
* ``momentum`` (None) — Adafactor first-moment decay (None = no first moment, as T5X).
* ``per_expert_stats`` (True) — Adafactor statistics per expert for ``…/expert/…`` leaves.
* ``clip_grad_norm`` (0.0) — global-norm gradient clipping threshold (0 or None = off).
* ``state_dtype`` (``"float32"``) — ``float32`` | ``bfloat16``: the storage dtype of every
  floating-point optimizer slot (AdamW ``mu``, ``nu``; Adafactor ``v_row``, ``v_col``, ``v``
  and momentum); the update itself is computed in float32 from float32 copies of the
  gradients, parameters and slots, and the new slots are rounded to nearest
  (``optim_dtype.with_state_dtype``, whose docstring says what bfloat16 slots lose). This
  project's option: optax keeps the slots in the parameter dtype (``mu_dtype`` /
  ``dtype_momentum`` choose one accumulator only), T5X's Adafactor in float32.

Schedules, with ``s = step + step_offset``, ``W = warmup_steps``, ``D = decay_steps``,
``p = clip((s - W) / (D - W), 0, 1)``, ``e = end_learning_rate_factor``:

* ``rsqrt``: ``lr = learning_rate / sqrt(max(s, W, 1))``. This is T5X's default
  ``'constant * rsqrt_decay'`` (``create_learning_rate_scheduler`` in ``t5x/utils.py``:
  ``ret /= sqrt(max(step, warmup_steps))``). With ``learning_rate=1, W=10_000`` it is Adafactor's
  relative step size ``rho_t = min(1e-2, 1/sqrt(t))`` (Shazeer & Stern 2018, §8). Differences from
  T5X: T5X's ``step_offset`` is *subtracted* (its step counter continues across fine-tuning, ours
  restarts at 0, so ours is added); T5X floors the rate at ``min_learning_rate=1e-8`` (not done
  here); the ``1`` in the ``max`` only avoids a division by zero when ``W=0``.
* ``cosine``: ``lr * s/W`` while ``s < W``, then ``lr * (e + (1-e) * (1 + cos(pi p)) / 2)``
  (Loshchilov & Hutter 2017, SGDR, one cycle without restarts).
* ``linear``: ``lr * s/W`` while ``s < W``, then ``lr * (1 - (1-e) p)``.
* ``constant``: ``lr * s/W`` while ``s < W``, then ``lr``.

Adafactor (Shazeer & Stern 2018, Algorithms 4 and 5) is ``optax.adafactor`` with T5X's defaults
(``t5x/adafactor.py``, ``Adafactor.__init__``): factored second moments, ``decay_rate=0.8`` with
``beta2_t = 1 - (t+1)^-0.8`` (``_decay_rate_pow`` in both), no momentum, update clipping 1.0,
``multiply_by_parameter_scale``, ``epsilon1=1e-30`` (optax ``eps``), ``epsilon2=1e-3`` (optax's
``scale_by_param_block_rms(min_scale=1e-3)``, fixed), ``min_dim_size_to_factor=128``. optax's
chain (factored rms -> block-rms clip -> lr -> param scale -> momentum -> weight decay) is T5X's
``apply_param_gradient`` order; global-norm clipping, as T5X's ``global_norm_clip_threshold``, runs
before it. What differs between them (read from ``optax/_src/factorized.py`` of optax 0.2.8 and
``t5x/adafactor.py``, ``t5x/contrib/moe/adafactor_utils.py`` of google-research/t5x):

* Which dims are factored. Both pick, by default, the two largest dims (``np.argsort`` of the
  shape), ``v_row`` = mean of ``g^2 + eps1`` over the largest dim ``d0``, ``v_col`` = mean over the
  second largest ``d1``. For 2-D params the two agree exactly, state shapes included. T5X refuses
  that heuristic for rank > 2 and needs factor rules; T5X MoE's rules are ``expert: BATCH,
  embed: ROW, expert_mlp: COLUMN`` (``v_row`` drops the COLUMN dim), so an expert kernel
  ``[E, d, f]`` is factored per expert, whatever E is. optax applied to ``[E, d, f]`` factors the
  two largest dims, which is per expert only while ``E < min(d, f)``.
* What "a block" is. optax's update clipping and parameter scale take the RMS over the whole leaf;
  T5X averages over non-BATCH dims, i.e. per expert. Updates of ``[E, d, f]`` differ (the RMS of a
  busy expert's update would clip the others).
* T5X with explicit rules factors regardless of ``min_dim_size_to_factor``; optax always checks it.
* State dtype: optax keeps moments in the parameter dtype, T5X in float32. Here they are
  float32 unless ``state_dtype`` says otherwise, whatever ``model.param_dtype`` is.

``per_expert_stats=True`` (default) removes the first two differences: every leaf whose path has an
``expert`` component is given to ``jax.vmap`` of ``optax.adafactor`` over its leading expert axis,
so each expert is its own block, as with T5X's BATCH rule; its state keeps the stacked layout
(``v_row [E, d]``, ``v_col [E, f]``, counters ``[E]``), the layout of tiled T5X slots. Only the
``min_dim_size_to_factor`` check (now on the ``[d, f]`` slice) remains different.

AdamW is ``optax.adamw`` (Loshchilov & Hutter 2019): ``p -= lr_t * (m_hat / (sqrt(v_hat) + eps) +
wd * p)``; as in optax and PyTorch the decay is multiplied by the scheduled rate. Adafactor's
``weight_decay`` is T5X's ``weight_decay_rate``: ``p <- (1 - wd) p - update``, not scaled by the
rate. Weight decay is masked off for leaves named ``bias`` or ``scale`` and for leaves of rank <= 1.

``optim_slots.load_adafactor_slots`` puts a dense T5X Adafactor state, tiled into experts by the
surgeon, into the optax state (see its docstring for the mapping). T5X's own
``sparse_upcycle.gin`` resets the optimizer state (``state/param_states.*`` -> None); keeping
it is this project's option.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sparse_upcycle.checkpoints.tree import key_name
from sparse_upcycle.optim_dtype import DTYPES as STATE_DTYPES
from sparse_upcycle.optim_dtype import with_state_dtype

Schedule = Callable[[Any], jax.Array]

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "cosine", "linear", "constant")
EXPERT_KEY = "expert"  # path component marking stacked expert params [E, ...] (DESIGN.md)


def default_optimizer_config(name: str = "adafactor") -> ml_collections.ConfigDict:
    """Every ``optimizer`` field with its default for ``name`` (see the module docstring)."""
    _check_choice("optimizer.name", name, OPTIMIZERS)
    adafactor = name == "adafactor"
    return ml_collections.ConfigDict(
        {
            "name": name,
            "learning_rate": 1.0 if adafactor else 1e-3,
            "schedule": "rsqrt" if adafactor else "cosine",
            "warmup_steps": 10_000 if adafactor else 1_000,
            "step_offset": 0,
            "decay_steps": None if adafactor else 100_000,
            "end_learning_rate_factor": 0.0,
            "weight_decay": 0.0 if adafactor else 1e-4,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "decay_rate": 0.8,
            "clipping_threshold": 1.0,
            "multiply_by_parameter_scale": True,
            "factored": True,
            "min_dim_size_to_factor": 128,
            "momentum": None,
            "per_expert_stats": True,
            "clip_grad_norm": 0.0,
            "state_dtype": "float32",
        }
    )


def check_optimizer_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError for an ``optimizer`` block ``make_optimizer`` would refuse or that
    makes no sense (an unknown field or schedule, a negative or non-finite rate, ...), without
    building anything."""
    make_schedule(cfg)


def make_optimizer(
    cfg: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, Schedule]:
    """The optax transformation and its learning-rate schedule from an ``optimizer`` block.

    Args:
      cfg: the ``optimizer`` block, or a config holding one as ``cfg.optimizer``. Fields it does
        not give take ``default_optimizer_config(cfg.name)``'s values.

    Returns:
      ``(tx, schedule)``; ``schedule(step)`` is the rate of the update at training step ``step``.

    Raises:
      ValueError: an unknown ``name``/``schedule``/field, or inconsistent schedule lengths.
    """
    o = _resolve(cfg)
    schedule = make_schedule(o)
    if o.name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay or 0.0,
            mask=decay_mask,
        )
    else:

        def adafactor() -> optax.GradientTransformation:
            return optax.adafactor(
                learning_rate=schedule,
                min_dim_size_to_factor=o.min_dim_size_to_factor,
                decay_rate=o.decay_rate,
                multiply_by_parameter_scale=o.multiply_by_parameter_scale,
                clipping_threshold=o.clipping_threshold,
                momentum=o.momentum,
                weight_decay_rate=o.weight_decay or None,
                eps=1e-30,  # T5X epsilon1
                factored=o.factored,
                weight_decay_mask=decay_mask,
            )

        tx = adafactor()
        if o.per_expert_stats:
            tx = optax.partition(
                {"expert": _over_leading_axis(adafactor()), "other": tx}, _expert_labels
            )
    if o.clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
    # outermost, so clipping too runs in float32 on bfloat16 gradients
    return with_state_dtype(tx, o.state_dtype), schedule


def make_schedule(cfg: ml_collections.ConfigDict) -> Schedule:
    """``step -> learning rate`` (float32) for an ``optimizer`` block (as ``make_optimizer``
    takes it); formulas in the module docstring. ``step`` may be a Python int or a (traced) jnp
    integer."""
    o = _resolve(cfg)
    base, warmup, offset = float(o.learning_rate), int(o.warmup_steps), int(o.step_offset)
    if warmup < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup}")
    if o.schedule == "rsqrt":
        floor = float(max(warmup, 1))
        return lambda step: base * jax.lax.rsqrt(jnp.maximum(_offset_step(step, offset), floor))

    end = float(o.end_learning_rate_factor)
    if o.schedule == "constant":
        decay = lambda s: jnp.ones_like(s)
    else:
        if o.decay_steps is None or int(o.decay_steps) <= warmup:
            raise ValueError(
                f"optimizer.decay_steps must be > warmup_steps ({warmup}) for schedule "
                f"{o.schedule!r}, got {o.decay_steps}"
            )
        total = int(o.decay_steps)
        # remaining = 1 - p, computed from the end so it stays exact in float32 near p = 1
        remaining = lambda s: jnp.clip((total - s) / float(total - warmup), 0.0, 1.0)
        if o.schedule == "cosine":
            # (1 + cos(pi p)) / 2 = sin(pi (1 - p) / 2)^2, which has no float32 cancellation
            # near the end of the decay (the rate there is accurate to rounding, not to 1e-5)
            decay = lambda s: end + (1.0 - end) * jnp.square(jnp.sin(0.5 * jnp.pi * remaining(s)))
        else:
            decay = lambda s: end + (1.0 - end) * remaining(s)

    def schedule(step):
        s = _offset_step(step, offset)
        ramp = s / warmup if warmup else jnp.ones_like(s)
        return base * jnp.where(s < warmup, ramp, decay(s))

    return schedule


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not on ``bias``/``scale`` leaves nor on rank <= 1."""

    def decayed(path, x):
        return key_name(path[-1]) not in ("bias", "scale") and jnp.ndim(x) > 1

    return jax.tree_util.tree_map_with_path(decayed, params)


# --------------------------------------------------------------------------- config checking
def _resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    def is_block(x) -> TypeGuard[Mapping | ml_collections.ConfigDict]:
        return isinstance(x, (Mapping, ml_collections.ConfigDict))

    block = cfg.get("optimizer", cfg) if is_block(cfg) else cfg
    if not is_block(block):
        raise ValueError(f"optimizer config must be a ConfigDict, got {type(block).__name__}")
    out = default_optimizer_config(block.get("name", "adafactor"))
    unknown = sorted(set(block.keys()) - set(out.keys()))
    if unknown:
        raise ValueError(f"unknown optimizer field(s) {unknown}; known: {sorted(out.keys())}")
    with out.unlocked():
        for key, value in block.items():
            out[key] = value
    _check_choice("optimizer.schedule", out.schedule, SCHEDULES)
    _check_choice("optimizer.state_dtype", out.state_dtype, STATE_DTYPES)
    _check_ranges(out)
    return out


# Fields that must be numbers >= 0 (a negative rate would ascend the loss; a negative decay or
# threshold has no meaning), and those in [0, 1) (moving-average rates).
_NON_NEGATIVE = (
    "learning_rate",
    "weight_decay",
    "eps",
    "clipping_threshold",
    "clip_grad_norm",
    "end_learning_rate_factor",
)
_UNIT = ("b1", "b2", "decay_rate", "momentum")


def _check_ranges(o: ml_collections.ConfigDict) -> None:
    for key in (*_NON_NEGATIVE, *_UNIT):
        value = o.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"optimizer.{key} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"optimizer.{key} must be a finite number >= 0, got {value!r}")
        if key in _UNIT and value >= 1:
            raise ValueError(f"optimizer.{key} must be in [0, 1), got {value!r}")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


def _offset_step(step, offset: int) -> jax.Array:
    return jnp.asarray(step, jnp.float32) + offset


# --------------------------------------------------------------------------- per-expert Adafactor
def _expert_labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "expert" if EXPERT_KEY in map(key_name, path) else "other", params
    )


def _over_leading_axis(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to every leading-axis slice separately (``jax.vmap``): each expert is
    its own Adafactor block, as T5X's ``FactorDim.BATCH`` makes it. A tree with no array (a
    model without experts: ``optax.partition`` hands over only masked nodes) goes straight
    through, since ``vmap`` needs an array to map."""

    def init(params):
        if not jax.tree.leaves(params):
            return inner.init(params)
        return jax.vmap(inner.init)(params)

    def update(updates, state, params=None):
        if not jax.tree.leaves(updates):
            return inner.update(updates, state, params)
        return jax.vmap(inner.update)(updates, state, params)

    return optax.GradientTransformation(init, update)


__all__ = [
    "check_optimizer_config",
    "decay_mask",
    "default_optimizer_config",
    "make_optimizer",
    "make_schedule",
]
