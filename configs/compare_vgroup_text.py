r"""Virtual-group (fine-grained) upcycling on real text: the router's ordering and the weight
scaling of He et al. 2024 ("Upcycling Large Language Models into Mixture of Experts", §3-4),
who find softmax-then-top-K better than top-K-then-softmax and weight scaling better than
none, as four arms on one dense checkpoint next to dense continuation and plain copies.

    sparse-upcycle compare --config configs/compare_vgroup_text.py:tiny --workdir /tmp/cmp_vg_tiny
    sparse-upcycle compare --config configs/compare_vgroup_text.py --workdir /tmp/cmp_vgroup

Data, model, dense pre-training and budget as ``configs/compare_btx_text.py`` (the Python docs,
a Llama-style decoder with d=128, 4 layers, f=512; 600 dense steps, then +50% of that compute
per arm; every arm restarts with a short warmup and cosine to 0; 3 seeds).

Arms:

* ``dense``: dense continuation.
* ``upcycled``: 8 copies of the MLP in every other layer, Mixtral routing (top-2, softmax
  over the picked two, dropless): the coarse recipe, for reference.
* ``vg_<ordering>_<scaling>``: E8G2T2, the virtual-group recipe (``upcycle.method =
  virtual_group``, expansion 8, granularity 2, top-2): 16 experts of width f/2 = 256; expert
  j holds half j mod 2 of the dense hidden units and the router's columns come in equal
  pairs, so at the start top-2 picks one whole pair, whose two halves sum to the dense MLP.
  A token's expert FLOPs equal the dense MLP's, so these arms take about as many steps as
  ``dense``. The routing weights shrink the output at a near-uniform router: with
  ``softmax_then_topk`` (the probabilities over all 16, not renormalised) the pair gets
  2/16, with ``topk_then_softmax`` 1/2 each. ``scaling = paper`` multiplies each of the
  three gated matrices by a^(1/3) with a = E_x·G²/K = 16 or a = G = 2 (He et al.'s
  scaling; exact only for homogeneous activations, so not for SwiGLU); ``none`` leaves the
  shards as they are. Dropless, load-balancing loss 0.01, router z-loss 0.001.

Sizes (2-core CPU): ``:tiny`` d=64, 2 layers, seq 64, 200 dense steps; the default as above.
Results in the README ("Virtual groups: ordering and weight scaling").
"""

import ml_collections
from compare_btx_text import get_config as btx_config

EXPANSION, GRANULARITY, K = 8, 2, 2
ORDERINGS = {"softmax": "softmax_then_topk", "topk": "topk_then_softmax"}
SCALINGS = ("paper", "none")


def virtual_group_arm(ordering: str, scaling: str) -> dict:
    """One E8G2T2 arm; the model's router takes the same ordering as the recipe's scale."""
    return {
        "kind": "upcycle",
        "overrides": {
            "upcycle": {
                "method": "virtual_group",
                "expansion": EXPANSION,
                "granularity": GRANULARITY,
                "k": K,
                "ordering": ordering,
                "scaling": scaling,
            },
            "model": {"moe": {"k": K, "ordering": ordering}},
        },
    }


def get_config(arg=None):
    c = btx_config(arg)  # refuses unknown sizes
    arms = {
        "dense": {"kind": "dense", "overrides": {}},
        "upcycled": {"kind": "upcycle", "overrides": {}},
    }
    for short, ordering in ORDERINGS.items():
        for scaling in SCALINGS:
            arms[f"vg_{short}_{scaling}"] = virtual_group_arm(ordering, scaling)
    c.arms = ml_collections.ConfigDict(arms)
    return c
