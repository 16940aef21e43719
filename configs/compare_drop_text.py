r"""Drop-Upcycling over a long budget on real text: does re-initialising half of each expert's
hidden units (Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with
Partial Re-initialization", §3) overtake plain copies when the continued run is long?

    sparse-upcycle compare --config configs/compare_drop_text.py:tiny --workdir /tmp/cmp_drop_tiny
    sparse-upcycle compare --config configs/compare_drop_text.py --workdir /tmp/cmp_drop

Data, model and dense pre-training as ``configs/compare_btx_text.py`` (the Python docs, a
Llama-style decoder with d=128, 4 layers, f=512, 600 dense steps), but every arm continues for
+200% of the pre-training compute (four times the +50% where copies led by 0.016 nats), with
the usual short warmup and cosine to 0 over its own length; 3 seeds, 8 matched points.

Arms (they run in the order of their names):

* ``upcycled``: 8 copies of the MLP in every other layer, Mixtral routing (top-2, softmax
  over the picked two, dropless, load-balancing loss 0.01, router z-loss 0.001).
* ``drop``: the same MoE from the Drop-Upcycling recipe with r = 0.5: each expert keeps a
  random half of the dense hidden units and re-draws the other half (gate and up columns,
  down rows) from a normal with each matrix's own mean and std; one unit set per expert,
  shared by its three matrices, as the paper describes. The authors' per-matrix sets
  (``drop_units = per_matrix``) lost to the shared ones at +50% and are left out; add them
  with ``--config.arms.drop_per_matrix='{"kind":"upcycle","overrides":{"upcycle":
  {"method":"drop","drop_ratio":0.5,"drop_units":"per_matrix"}}}'``.
* ``dense``: dense continuation, for reference.

Sizes (2-core CPU): ``:tiny`` d=64, 2 layers, seq 64, 200 dense steps; the default as above.
Results in the README ("Drop-Upcycling over a long budget").
"""

import ml_collections
from compare_btx_text import get_config as btx_config

EXTRA = 2.0  # +200% of the dense pre-training compute
DROP_RATIO = 0.5


def get_config(arg=None):
    c = btx_config(arg)  # refuses unknown sizes
    c.extra_compute = EXTRA
    c.num_points = 8
    c.arms = ml_collections.ConfigDict(
        {
            "upcycled": {"kind": "upcycle", "overrides": {}},
            "drop": {
                "kind": "upcycle",
                "overrides": {"upcycle": {"method": "drop", "drop_ratio": DROP_RATIO}},
                "against": ["upcycled"],  # the verdict this config is for, paired by seed
            },
            "dense": {"kind": "dense", "overrides": {}},
        }
    )
    return c
