r"""A dense Qwen2 / Qwen3 upcycled into a fine-grained MoE with shared experts (Qwen1.5-MoE style).

Qwen reported building Qwen1.5-MoE-A2.7B from the dense Qwen-1.8B: many fine-grained routed
experts plus always-on shared experts (the DeepSeek-MoE shape, Dai et al. 2024, §3). This
config does that with the ``fine_grained_shared`` method (``upcycle/experts.py`` has the
formulas): the dense MLP's hidden units are cut into G = 8 shards of f/8; S = 2 shards form
the shared experts (width 2·f/8, behind Qwen2-MoE's sigmoid gate, initialised at zero and
compensated); the other 6 shards seed E = 24 routed experts (4 replicas of the 6 shards; the
router's columns come in runs of 6 equal ones) and each token takes K = 6 of them. Routing is
Qwen2-MoE's: softmax over the 24 experts, top-6, renormalised (HF ``norm_topk_prob=True``),
dropless. The K weights then sum to one, so the routed experts (scaled by 6) add up to the 6
routed shards of the dense MLP for *any* router, and the upcycled model computes the dense
function: ``recipe_name`` E24S2G8T6, ``preserves_dense_function`` true, and ``verify``
checks it. Every other block is an MoE layer (Komatsuzaki et al. 2023's layout; HF
``decoder_sparse_step=2``). Per token the MoE layer computes one dense MLP's worth (2 shared +
6 routed shards of f/8) and holds 3.25 × its parameters (26 shards).

Arguments:

* (none): the architecture from the HF directory given as ``--src`` / ``init_from``
  (``model.name = "checkpoint"``), for a dense **Qwen2** (``Qwen2ForCausalLM``: exports to
  ``Qwen2MoeForCausalLM``, which always gates its shared expert).
* ``qwen3``: the same without shared experts (E24S0G8T8: 24 routed experts of f/8, 3 replicas
  of all 8 shards, top-8), for a dense **Qwen3**: HF's ``Qwen3MoeForCausalLM`` has no shared
  experts, and no HF class has Qwen3's attention with them.
* ``qwen2.5-0.5b`` / ``qwen2.5-1.5b``: the default recipe on those shapes without a
  checkpoint (Qwen/Qwen2.5-0.5B and -1.5B config.json: 494,032,768 and 1,543,714,304
  parameters dense, counted from our abstract parameters), for ``plan``.
* ``tiny_dense`` / ``tiny``: CPU-sized (decoder "qwen2-tiny": d=32, f=64, 2 layers, q/k/v
  biases, vocabulary 128, synthetic Markov-chain text): ``tiny_dense`` trains the dense model
  from scratch; ``tiny`` trains the upcycled MoE.

Commands (``init_from`` is empty on purpose for the real-size and default variants):

    sparse-upcycle upcycle --config configs/qwen_moe_fine_grained.py --src QWEN2_DIR --dst MOE
    sparse-upcycle verify --config configs/qwen_moe_fine_grained.py --dense QWEN2_DIR --moe MOE
    sparse-upcycle export --src MOE --dst MOE_HF

The README's "Fine-grained + shared experts from a dense Qwen2" section has these run on a
tiny Qwen2 made on this machine, with their output.
"""

import ml_collections
from _decoder_common import adamw, full_scale_run, tiny_run

from sparse_upcycle.train import default_config

GRANULARITY = 8
SHARED = 2
ROUTED = 24
K = 6
ARGS = (None, "qwen3", "qwen2.5-0.5b", "qwen2.5-1.5b", "tiny_dense", "tiny")


def _moe(shared_gate: bool, k: int) -> dict:
    return {
        "layers": "every_other",
        "router": "top_k",
        "k": k,
        "ordering": "softmax_then_topk",
        "renormalize": True,  # HF norm_topk_prob=True: the K weights sum to one
        "capacity_factor": None,  # dropless, as HF's Qwen2-MoE / Qwen3-MoE
        "eval_capacity_factor": None,
        "group_size": 4096,
        "router_init_std": 0.02,
        "aux_loss_weight": 0.001,  # HF Qwen2-MoE's router_aux_loss_coef
        "router_z_loss_weight": 0.0,
        "shared_expert_gate": shared_gate,
    }


def _recipe(shared: int, num_experts: int, k: int) -> dict:
    return {
        "method": "fine_grained_shared",
        "num_experts": num_experts,
        "shared_experts": shared,
        "granularity": GRANULARITY,
        "k": k,
        "ordering": "softmax_then_topk",
        "renormalize": True,
        "scaling": "exact",
        "router_init_std": 0.02,
        "reinit_ratio": 0.0,
        "seed": 0,
        "optimizer": "reset",
        "step": "reset",
    }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in ARGS:
        raise ValueError(f"arg must be one of {ARGS[1:]} or empty, got {arg!r}")
    c = default_config()
    c.loss = ml_collections.ConfigDict({"z_loss": 0.0, "label_smoothing": 0.0})
    qwen3 = arg == "qwen3"
    shared, k = (0, GRANULARITY) if qwen3 else (SHARED, K)
    if arg in ("tiny", "tiny_dense"):
        c.model = ml_collections.ConfigDict(
            {"family": "decoder", "name": "qwen2-tiny", "overrides": {}}
        )
        tiny_run(c, 300 if arg == "tiny_dense" else 200, eps=1e-8)
        if arg == "tiny":
            c.model.moe = _moe(True, K)
            c.upcycle = _recipe(SHARED, ROUTED, K)
        return c

    name = "checkpoint" if arg in (None, "qwen3") else arg
    c.model = ml_collections.ConfigDict(
        {
            "family": "decoder",
            "name": name,
            "remat": "full",
            "overrides": {"dtype": "bfloat16"},
            "moe": _moe(not qwen3, k),
        }
    )
    full_scale_run(c, {"data": -1, "expert": 8, "model": 1})
    adamw(c, peak=1e-4, warmup=1_000, eps=1e-8, weight_decay=0.0)
    c.upcycle = _recipe(shared, ROUTED, k)
    return c
