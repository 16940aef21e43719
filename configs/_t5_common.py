"""Shared settings of the T5 experiment configs (``t5_{base,large,xl}_{dense_continue,upcycle,
moe_scratch}.py``): Komatsuzaki et al. 2023, "Sparse Upcycling", language experiments.

Each config file is ``get_config = t5_experiment(size, kind)``; this module is loaded by path
(config files are executed from a path by ``sparse_upcycle.config.load_config``, not imported
as a package). ``arg="tiny"`` gives the CPU variant, anything else (default) the paper scale.

Paper settings and where they come from. "Paper" = Komatsuzaki et al. 2023 §3.1 ("Design
decisions") and §4.1 as summarised in secondary write-ups (I could not read the PDF itself);
"T5X"/"flaxformer" = the public gin files of the MoE setup the paper's code base used:
``t5x/contrib/moe/configs/runs/{pretrain,sparse_upcycle}.gin`` (google-research/t5x) and
``flaxformer/t5x/configs/moe/{architectures/moe.gin,models/experts_choose_base.gin}``
(google/flaxformer).

=============================  =================================  ===============================
setting                        value here                         source
=============================  =================================  ===============================
model sizes                    T5 v1.1 base / large / xl          paper §2.2, §4.1
MoE layers                     every other MLP (blocks 1, 3, …)   paper §3.1 ("half of the MLP
                               in encoder and decoder             layers"); interleaving as
                                                                  flaxformer's MIXED layout
experts                        32                                 paper §3.1
encoder router                 expert choice, C = 2 (train and    paper §3.1 (C = 2); eval C not
                               eval), combine weights NOT         confirmed; no normalisation:
                               normalised                         paper §3.1 (it hurt language)
decoder router                 top-K, K = 2, softmax over all E   paper §3.1 (K = 2); ordering,
                               then top-2, not renormalised, no   BPR off: flaxformer moe.gin
                               batch-prioritised routing
decoder capacity               ``capacity_factor = 1.0`` here =   flaxformer: capacity =
                               2·S/E slots per expert = T5X's     round(C·S/E) whatever K is;
                               C = 2 (see below)                  C = 2 for the decoder: NOT
                                                                  confirmed
group size                     at most 4096 tokens, the number    flaxformer GROUP_SIZE and
                               of groups a multiple of E × data   ``_num_groups`` (paper: not
                               (``moe.group_multiple``)           confirmed)
router init                    N(0, 0.02²), no bias               flaxformer ``router_init``
aux (load-balance) loss        0.01; router z-loss 0.0            flaxformer experts_choose gin
                                                                  (paper: not confirmed)
expert init                    copies of the dense MLP            paper §3 (Figure 1)
optimizer                      Adafactor, T5X defaults (decay     T5X ``adafactor.Adafactor``
                               0.8, clip 1.0, param scale, no     via the MoE gin; paper: the
                               momentum), rsqrt, base 1.0,        dense run's hyperparameters
                               10k warm-up plateau                (§3 "same batch size, learning
                                                                  rate schedule")
schedule continuation          ``optimizer.step_offset =          paper §4.1: the dense runs use
                               1_000_000`` (the public T5 1.1     rsqrt, so training continues
                               checkpoints' step): lr = 1e-3 at   "without discontinuities"; T5X
                               the first upcycled step            restores the step the same way
optimizer state                reset (``upcycle.optimizer =       paper §3.1 (no gain for
                               "reset"``)                         language); T5X
                                                                  sparse_upcycle.gin drops
                                                                  ``state/param_states``
data                           C4 span corruption, inputs 512,    paper §4.1 (C4 span
                               targets 114, batch 256             corruption); lengths, batch:
                                                                  T5X ``c4_pretrain.gin``
                                                                  (paper: batch NOT confirmed)
loss                           z-loss 1e-4, no label smoothing    flaxformer gin (Z_LOSS)
activations                    bfloat16 (params float32)          flaxformer ACTIVATION_DTYPE
=============================  =================================  ===============================

Capacity factors. This code base writes top-K capacity as ``ceil(C·S·K/E)`` (``routing.py``);
flaxformer/T5X as ``round(C·S/E)`` for every router. T5X's "C = 2 with top-2" (2·S/E slots per
expert, exactly the 2·S assignments on average) is therefore ``capacity_factor = 1.0`` here. For
expert choice both write ``C·S/E``: C = 2 here is C = 2 there.

Schedule mechanism. One mechanism is used everywhere: ``upcycle.step = "reset"`` and an explicit
``optimizer.step_offset`` = the dense checkpoint's step. It works for online upcycling
(``init_from`` = the dense checkpoint) and for an offline ``sparse-upcycle upcycle`` output alike;
``train.py`` honours ``step = "keep"`` only for the offline output, and the surgeon warns when
``keep`` meets an rsqrt schedule. A dense checkpoint at another step needs
``--config.optimizer.step_offset=<its step>``. ``moe_scratch`` starts the schedule at 0.

Paper scale needs data this repository cannot read yet: ``data.name = "c4_v220_span_corruption"``
stops the run at start-up with "unknown data.name". Step counts: ``dense_continue`` and
``upcycle`` run 500k more steps (+50% of the dense run's 1M steps, the paper's headline
"~50% of the sunk cost"; the paper's per-size budgets were read off its Figure 2 curves, which I
could not access); ``moe_scratch`` runs 1M steps (the paper's "100% of the dense budget").

Target topology and mesh: TPU v4 pod slices, 32 GiB of HBM per chip (``data`` × ``expert``
split the batch, ``expert`` also splits E, ``model`` splits heads, MLP width and vocabulary);
the paper's batch of 256 sequences, 512 input and 114 target tokens. base: v4-64 (32 chips),
``expert=8`` → data 4; large: v4-128 (64 chips), ``expert=16`` → data 4; xl: v4-256 (128
chips), ``expert=32, model=4`` → data 1, one expert per 4 chips (24 sparse layers × 32 experts
× 31M = 24B expert parameters). ``data=-1`` takes the remaining chips. XL needs ``model=4``:
with ``model=1`` its 2.9B non-expert parameters and their gradients are replicated on every
chip and ``plan`` finds 39.3 GiB per chip. ``plan`` of every config at its topology is in
``docs/plans.md`` (``scripts/plan_all.py``).

Routing groups (``moe.group_multiple``, ``GROUP_MULTIPLE``): as in flaxformer's MoE layer (the
paper's code, ``_num_groups``), the number of groups in a stack is the smallest multiple of
E × the expert replicas (here the ``data`` size: 4 for base and large, 1 for xl) that divides
the tokens and keeps groups at most 4096 tokens: base and large 128 groups (encoder 1024
tokens each, decoder 228), xl 32 (4096 and 912). With plain groups of 4096 a decoder stack has
8 groups and T5-large's encoder 32, fewer than the devices the ``expert`` axis splits them
over, so the layer gathered whole stacks onto every device instead of exchanging tokens
(``plan`` of t5_large_upcycle: 39.8 GiB all-gathered per step before, 0.5 GiB with it).

Rematerialisation (paper scale only; ``:tiny`` keeps ``none``): ``model.remat =
"dots_saveable"`` (``REMAT``, ``models/remat.py``): ``plan`` of t5_base_upcycle on 32 devices
finds 4.25 GiB of temporaries per device instead of 10.67 for a recomputation of elementwise
work only; ``--config.model.remat=full`` (3.59 GiB) or ``none`` override it.

Tiny variant (``:tiny``): T5 "tiny" (d=32, f=64, 2+2 layers, vocabulary 128), 4 experts in
blocks 1 of each stack, the paper's routers (expert choice C = 2, top-2) with groups of 64
tokens, synthetic seq2seq data (batch 16, inputs 32, targets 8), the same Adafactor with an
rsqrt plateau of 100 steps; 300 dense pre-training steps, then 200 more steps with
``step_offset = 300``. Mesh ``data=-1, expert=1`` (1 CPU device or 8 fake ones).
"""

from __future__ import annotations

import ml_collections

from sparse_upcycle.train import default_config

KINDS = ("dense_continue", "upcycle", "moe_scratch")
SIZES = ("base", "large", "xl")

NUM_EXPERTS = 32
DENSE_STEP = 1_000_000  # the public T5 1.1 T5X checkpoints: checkpoint_1000000
EXPERT_MESH = {"base": 8, "large": 16, "xl": 32}
MODEL_MESH = {"base": 1, "large": 1, "xl": 4}  # XL: 4-way model parallelism (docstring)
TPU_SLICE = {"base": "v4-64", "large": "v4-128", "xl": "v4-256"}
# Routing groups per stack: a multiple of E x the data-axis size of the topology (flaxformer's
# _num_groups, m = num_experts x expert replicas): base and large 32 x 4, xl 32 x 1 (docstring)
GROUP_MULTIPLE = {"base": 128, "large": 128, "xl": 32}

# Paper scale only (the tiny variant keeps "none"): every layer keeps its matmul outputs and
# recomputes the rest (models/remat.py). ``plan`` of t5_base_upcycle on 32 devices (2 shared
# CPU cores): temporaries 10.67 GiB/device with "none", 4.25 with "dots_saveable", 3.59 with
# "full".
REMAT = "dots_saveable"

TINY_EXPERTS = 4
TINY_DENSE_STEPS = 300  # the dense pre-training run of the two-step tiny recipe
TINY_STEPS = 200  # steps of the tiny dense_continue / upcycle / moe_scratch runs


def moe_blocks(num_experts: int, group_size: int, group_multiple: int = 1) -> tuple[dict, dict]:
    """(encoder_moe, decoder_moe) ``MoeConfig`` fields of the paper's language setting."""
    shared = {
        "layers": "every_other",
        "group_size": group_size,
        "group_multiple": group_multiple,
        "router_init_std": 0.02,
        "aux_loss_weight": 0.01,
        "router_z_loss_weight": 0.0,
    }
    encoder = {
        **shared,
        "router": "expert_choice",
        "capacity_factor": 2.0,
        "eval_capacity_factor": 2.0,
        "normalize_combine_weights": False,
    }
    decoder = {
        **shared,
        "router": "top_k",
        "k": 2,
        "capacity_factor": 1.0,  # ceil(1.0·S·2/E) = 2S/E slots: T5X's C = 2
        "eval_capacity_factor": 1.0,
        "ordering": "softmax_then_topk",
        "renormalize": False,
        "batch_prioritized": False,
    }
    return encoder, decoder


def recipe(num_experts: int) -> dict:
    """The ``upcycle`` block: copies of the dense MLP, fresh routers, fresh optimizer state."""
    return {
        "method": "copy",
        "num_experts": num_experts,
        "router_init_std": 0.02,
        "seed": 0,
        "noise_std": 0.0,
        "optimizer": "reset",
        "step": "reset",  # the schedule continues through optimizer.step_offset instead
    }


def t5_experiment(size: str, kind: str):
    """``get_config(arg)`` for one (size, kind); ``arg="tiny"`` gives the CPU variant."""
    if size not in SIZES or kind not in KINDS:
        raise ValueError(f"size must be one of {SIZES} and kind one of {KINDS}")

    def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
        if arg not in (None, "tiny"):
            raise ValueError(f"arg must be empty (paper scale) or 'tiny', got {arg!r}")
        return _tiny(kind) if arg == "tiny" else _paper(size, kind)

    return get_config


def _paper(size: str, kind: str) -> ml_collections.ConfigDict:
    c = default_config()
    c.model = ml_collections.ConfigDict(
        {"family": "t5", "name": size, "remat": REMAT, "overrides": {"dtype": "bfloat16"}}
    )
    c.init_from = "scratch" if kind == "moe_scratch" else ""  # "": train.py asks for a path
    c.total_steps = 1_000_000 if kind == "moe_scratch" else 500_000
    c.mesh = ml_collections.ConfigDict(
        {"data": -1, "expert": EXPERT_MESH[size], "model": MODEL_MESH[size]}
    )
    c.data = ml_collections.ConfigDict(
        {
            "name": "c4_v220_span_corruption",
            "batch_size": 256,
            "seq_len": 512,
            "target_len": 114,
            "seed": 0,
        }
    )
    c.optimizer.step_offset = 0 if kind == "moe_scratch" else DENSE_STEP
    c.loss.z_loss = 1e-4
    c.log_every = 100
    c.eval_every = 5_000
    c.eval_steps = 20
    c.checkpoint = ml_collections.ConfigDict({"every": 5_000, "keep": 5, "async": True})
    if kind != "dense_continue":
        c.model.encoder_moe, c.model.decoder_moe = moe_blocks(
            NUM_EXPERTS, 4096, GROUP_MULTIPLE[size]
        )
        c.upcycle = recipe(NUM_EXPERTS)
    return c


def _tiny(kind: str) -> ml_collections.ConfigDict:
    c = default_config()
    c.model = ml_collections.ConfigDict({"family": "t5", "name": "tiny", "overrides": {}})
    c.init_from = "scratch" if kind == "moe_scratch" else ""
    c.total_steps = TINY_DENSE_STEPS + TINY_STEPS if kind == "moe_scratch" else TINY_STEPS
    c.mesh = ml_collections.ConfigDict({"data": -1, "expert": 1, "model": 1})
    c.data = ml_collections.ConfigDict(
        {"name": "synthetic", "batch_size": 16, "seq_len": 32, "target_len": 8, "seed": 0}
    )
    c.optimizer.warmup_steps = 100
    c.optimizer.step_offset = 0 if kind == "moe_scratch" else TINY_DENSE_STEPS
    c.log_every = 20
    c.eval_every = 100
    c.eval_steps = 4
    c.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 2, "async": True})
    if kind != "dense_continue":
        c.model.encoder_moe, c.model.decoder_moe = moe_blocks(TINY_EXPERTS, 64)
        c.upcycle = recipe(TINY_EXPERTS)
    return c
