"""Shared settings of the ViT experiment configs (``vit_{b16,l16}_{dense_continue,upcycle,
moe_scratch}.py``): Komatsuzaki et al. 2023, "Sparse Upcycling", vision experiments.

Each config file is ``get_config = vit_experiment(size, kind)``; this module is loaded by path
(``load_config`` executes config files from a path). ``arg="tiny"`` gives the CPU variant,
anything else (default) the paper scale.

Paper settings and where they come from. "Paper" = Komatsuzaki et al. 2023 §2.2, §3.1, §4.1 as
summarised in secondary write-ups (I could not read the PDF itself); "V-MoE" = Riquelme et al.
2021 and its public configs (google-research/vmoe ``vmoe/configs/vmoe_paper/common.py``).

=============================  =================================  ===============================
setting                        value here                         source
=============================  =================================  ===============================
model                          ViT-B/16, ViT-L/16, 224×224        paper §2.2 (B/32, B/16, L/32,
                                                                  L/16 upcycled)
pooling                        global average (``gap``)           paper §2.2 (differs from V-MoE
                                                                  there: GAP, expert choice)
classes                        18291 (JFT-300M)                   paper §4.1 (upstream JFT-300M)
MoE layers                     every other block (1, 3, …, as     paper §3.1 ("half of the MLP
                               V-MoE "Every 2")                   layers"); the interleaving is
                                                                  not confirmed (V-MoE also used
                                                                  "Last n")
experts                        32                                 paper §3.1
router                         expert choice, C = 2 (train and    paper §3.1; eval C not
                               eval), combine weights             confirmed; normalisation:
                               normalised per token               paper §3.1 (helps vision)
group size                     8 images × 196 tokens = 1568       V-MoE's rule (8 images per
                                                                  group); paper: not confirmed
router init                    N(0, 0.02²)                        not confirmed (T5X MoE default)
aux loss                       0.01; router z-loss 0.0            not confirmed (expert choice
                                                                  is balanced by construction)
optimizer state                kept: dense Adafactor moments      paper §3.1 (resuming helps
                               tiled into every expert            vision only)
                               (``upcycle.optimizer = "tile"``)
schedule                       rsqrt, continued from the dense    paper §4.1: all dense
                               step (``optimizer.step_offset``)   checkpoints used rsqrt, so
                                                                  training continues without a
                                                                  discontinuity
optimizer values               Adafactor with first moment 0.9,   NOT confirmed: Scaling-ViT
                               no parameter scaling, peak rate    style Adafactor (Zhai et al.
                               8e-4 (B) / 4e-4 (L) at the end of  2022); peaks are V-MoE's
                               a 10k-step plateau, no weight      per-size values; Adafactor
                               decay                              because ``tile`` fills
                                                                  Adafactor slots
data                           JFT-300M, batch 4096               paper §4.1 (JFT-300M); batch:
                                                                  V-MoE's, NOT confirmed
=============================  =================================  ===============================

Known limitations of running this here:

* ``upcycle.optimizer = "tile"`` needs a dense checkpoint that holds Adafactor slots in T5X's
  layout (``…/kernel/v_row``, ``v_col``, ``v``, ``m``): a T5X checkpoint, or an ``upcycle``
  output made from one. big_vision ``.npz`` checkpoints carry no optimizer state this code reads
  (nor do HF checkpoints or this trainer's own Orbax checkpoints, whose optax state is not read
  as slots); with them the run stops with "holds none; use optimizer=reset" and
  ``--config.upcycle.optimizer=reset`` is the way on.
* The dense step is not known in advance (the paper's dense ViTs are not public):
  ``optimizer.step_offset`` is 0 in the file and MUST be set to the dense checkpoint's step on
  the command line, or the rsqrt schedule restarts at its peak.
* The checkpoint must match the architecture: ``pool_type = "gap"`` has no ``cls`` token, and
  a class-token checkpoint (AugReg, HF) stops the run with "dense parameters the MoE model has no
  place for: ['cls']"; give ``--config.model.overrides.pool_type=tok`` (and its
  ``num_classes``) for those.
* Data: ``data.name = "jft300m"`` stops the run at start-up with "unknown data.name" (there is
  no JFT pipeline; JFT is also multi-label, trained with a sigmoid loss, which ``task.py`` lacks).

Rematerialisation (paper scale only; ``:tiny`` keeps ``none``): ``model.remat =
"dots_saveable"`` (``REMAT``, ``models/remat.py``), which ``plan`` finds enough for ViT-B/16
upcycling on 32 chips of 32 GiB; ``--config.model.remat=full`` saves more and recomputes more.

Step counts (NOT from the paper): 250k more steps for ``dense_continue`` and ``upcycle``, 500k for
``moe_scratch``. Target topology and mesh: TPU v4 slices, 32 GiB of HBM per chip, the paper's
batch of 4096 images at 224×224 (196 patch tokens, GAP head): B/16 on v4-64 (32 chips)
with ``expert=8``; L/16 on v4-128 (64 chips) with ``expert=16``; ``data=-1`` takes the rest.
``plan`` of every config at its topology is in ``docs/plans.md`` (``scripts/plan_all.py``).

Tiny variant (``:tiny``): ViT "tiny" (28×28×1 images, patch 7, 16 tokens, width 32, depth 2,
10 classes), GAP, 4 experts in block 1, expert choice C = 2 with normalised weights in groups of
8 images, synthetic images (batch 32, noise 4.0: the default 1.0 is solved within 100 steps),
the same Adafactor (peak 1e-2 over a 100-step plateau), ``upcycle.optimizer = "reset"`` (the
trainer's own checkpoints carry no T5X slots to tile; see above); 300 dense pre-training steps,
then 200 more with ``step_offset = 300``.
"""

from __future__ import annotations

import math

import ml_collections

from sparse_upcycle.optim import default_optimizer_config
from sparse_upcycle.train import default_config

KINDS = ("dense_continue", "upcycle", "moe_scratch")
SIZES = {"b16": "B/16", "l16": "L/16"}

NUM_EXPERTS = 32
JFT_CLASSES = 18291
PATCHES = (224 // 16) ** 2  # 196 tokens per image with GAP (no class token)
PEAK_LR = {"b16": 8e-4, "l16": 4e-4}  # V-MoE's per-size peak rates
WARMUP = 10_000
EXPERT_MESH = {"b16": 8, "l16": 16}
TPU_SLICE = {"b16": "v4-64", "l16": "v4-128"}

# Paper scale only (the tiny variant keeps "none"): every block keeps its matmul outputs and
# recomputes the rest (models/remat.py). ``plan`` of vit_b16_upcycle on 32 devices (2 shared
# CPU cores): temporaries 37.07 GiB/device with "none" (does not fit 32 GiB), 12.31 with
# "dots_saveable", 6.57 with "full".
REMAT = "dots_saveable"

TINY_EXPERTS = 4
TINY_TOKENS = 16  # (28 // 7) ** 2 patches
TINY_WARMUP = 100
TINY_PEAK_LR = 1e-2
TINY_DENSE_STEPS = 300
TINY_STEPS = 200


def moe_block(group_size: int) -> dict:
    """``MoeConfig`` fields of the paper's vision setting."""
    return {
        "layers": "every_other",
        "router": "expert_choice",
        "capacity_factor": 2.0,
        "eval_capacity_factor": 2.0,
        "normalize_combine_weights": True,
        "group_size": group_size,
        "router_init_std": 0.02,
        "aux_loss_weight": 0.01,
        "router_z_loss_weight": 0.0,
    }


def recipe(num_experts: int, optimizer: str) -> dict:
    return {
        "method": "copy",
        "num_experts": num_experts,
        "router_init_std": 0.02,
        "seed": 0,
        "noise_std": 0.0,
        "optimizer": optimizer,
        "step": "reset",  # the schedule continues through optimizer.step_offset instead
    }


def optimizer(peak: float, warmup: int, step_offset: int) -> ml_collections.ConfigDict:
    """Adafactor with a first moment and absolute rates; rsqrt with ``peak`` on the plateau.

    The rsqrt schedule is ``learning_rate / sqrt(max(step, warmup))`` (``optim.py``), so the
    base rate is ``peak · sqrt(warmup)``."""
    o = default_optimizer_config("adafactor")
    o.schedule = "rsqrt"
    o.learning_rate = peak * math.sqrt(warmup)
    o.warmup_steps = warmup
    o.step_offset = step_offset
    o.multiply_by_parameter_scale = False
    o.momentum = 0.9
    o.weight_decay = 0.0
    return o


def vit_experiment(size: str, kind: str):
    """``get_config(arg)`` for one (size, kind); ``arg="tiny"`` gives the CPU variant."""
    if size not in SIZES or kind not in KINDS:
        raise ValueError(f"size must be one of {sorted(SIZES)} and kind one of {KINDS}")

    def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
        if arg not in (None, "tiny"):
            raise ValueError(f"arg must be empty (paper scale) or 'tiny', got {arg!r}")
        return _tiny(kind) if arg == "tiny" else _paper(size, kind)

    return get_config


def _paper(size: str, kind: str) -> ml_collections.ConfigDict:
    c = default_config()
    c.model = ml_collections.ConfigDict(
        {
            "family": "vit",
            "name": SIZES[size],
            "remat": REMAT,
            "overrides": {"pool_type": "gap", "num_classes": JFT_CLASSES, "dtype": "bfloat16"},
        }
    )
    c.init_from = "scratch" if kind == "moe_scratch" else ""  # "": train.py asks for a path
    c.total_steps = 500_000 if kind == "moe_scratch" else 250_000
    c.mesh = ml_collections.ConfigDict({"data": -1, "expert": EXPERT_MESH[size], "model": 1})
    c.data = ml_collections.ConfigDict({"name": "jft300m", "batch_size": 4096, "seed": 0})
    c.optimizer = optimizer(PEAK_LR[size], WARMUP, step_offset=0)  # set it to the dense step
    c.loss = ml_collections.ConfigDict({"z_loss": 0.0, "label_smoothing": 0.0})
    c.log_every = 100
    c.eval_every = 5_000
    c.eval_steps = 20
    c.checkpoint = ml_collections.ConfigDict({"every": 5_000, "keep": 5, "async": True})
    if kind != "dense_continue":
        c.model.moe = moe_block(8 * PATCHES)
        c.upcycle = recipe(NUM_EXPERTS, "tile")
    return c


def _tiny(kind: str) -> ml_collections.ConfigDict:
    c = default_config()
    c.model = ml_collections.ConfigDict(
        {"family": "vit", "name": "tiny", "overrides": {"pool_type": "gap"}}
    )
    c.init_from = "scratch" if kind == "moe_scratch" else ""
    c.total_steps = TINY_DENSE_STEPS + TINY_STEPS if kind == "moe_scratch" else TINY_STEPS
    c.mesh = ml_collections.ConfigDict({"data": -1, "expert": 1, "model": 1})
    c.data = ml_collections.ConfigDict(
        {"name": "synthetic", "batch_size": 32, "seed": 0, "noise": 4.0}
    )
    offset = 0 if kind == "moe_scratch" else TINY_DENSE_STEPS
    c.optimizer = optimizer(TINY_PEAK_LR, TINY_WARMUP, step_offset=offset)
    c.loss = ml_collections.ConfigDict({"z_loss": 0.0, "label_smoothing": 0.0})
    c.log_every = 20
    c.eval_every = 100
    c.eval_steps = 8
    c.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 2, "async": True})
    if kind != "dense_continue":
        c.model.moe = moe_block(8 * TINY_TOKENS)
        c.upcycle = recipe(TINY_EXPERTS, "reset")
    return c
