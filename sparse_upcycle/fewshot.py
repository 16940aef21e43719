"""Few-shot linear probes on frozen pre-logit features, the downstream evaluation of the paper's
vision models (Komatsuzaki et al. 2023, §3: ImageNet 10-shot; the protocol of big_vision's
``evaluators/fewshot_lsr.py`` and vmoe's few-shot evaluator).

Run config block ``fewshot`` (off while ``dataset`` is empty): at every evaluation ``train``
adds ``fewshot/<dataset>_<k>shot`` (test accuracy, mean over ``seeds``) for each ``k`` in
``shots``, so ``compare`` reports it at every matched compute point of every arm.

Dataset: ``digits``, scikit-learn's bundled copy of the UCI optical digits (1,797 8×8 images,
values 0-16, ten classes; read from the installed package, nothing is downloaded). The images
are scaled to [0, 1], resized bilinearly to the model's input size, repeated over its channels
and standardised with the mean and std of their pixels. A fixed permutation (seed 0) holds out
797 test images; the other 1,000 are the pool the shots come from.

Probe, per seed ``s`` and shot count ``k``: ``k`` images per class drawn from the pool by
``numpy.random.default_rng(s)``; their features are standardised with the shots' own mean and
std (+1e-5), a constant feature of 100 is appended (the bias, almost unregularised) and the
targets are the one-hot labels mapped to {-1, 1}. The ridge solution is ``W = (XᵀX + λI)⁻¹XᵀY``
(computed through the eigendecomposition of XᵀX or, with fewer shots than features, of XXᵀ:
``W = Xᵀ(XXᵀ + λI)⁻¹Y``, the same matrix). Unlike big_vision's fixed λ, λ is picked from
``l2_grid`` by accuracy on 10 other pool images per class (never the test images); the
prediction is the arg max of ``x W``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sparse_upcycle.config import ConfigError

DATASETS = ("digits",)
BIAS_FEATURE = 100.0
TEST_IMAGES = 797
MINIVAL_PER_CLASS = 10


def digits_images(image_size: tuple[int, int], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, H, W, C] float32 standardised, labels [1797] int32)."""
    from sklearn.datasets import load_digits

    d: Any = load_digits()  # a Bunch (return_X_y=False)
    x = np.asarray(d.images, np.float32) / 16.0
    x = np.asarray(jax.image.resize(x, (x.shape[0], *image_size), "bilinear"), np.float32)
    x = (x - x.mean()) / x.std()
    x = np.repeat(x[..., None], channels, axis=-1)
    return x, np.asarray(d.target, np.int32)


def _splits(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(len(labels))
    return order[TEST_IMAGES:], order[:TEST_IMAGES]  # pool, test


def ridge_accuracies(
    x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, l2_grid, classes: int
) -> np.ndarray:
    """Accuracy on ``(x_eval, y_eval)`` of the ridge probe fitted on ``(x, y)``, for every λ of
    ``l2_grid`` (the module docstring's formula), float64 throughout."""
    x, x_eval = np.asarray(x, np.float64), np.asarray(x_eval, np.float64)
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5

    def prepare(a):
        a = (a - mean) / std
        return np.concatenate([a, np.full((a.shape[0], 1), BIAS_FEATURE)], axis=1)

    x, x_eval = prepare(x), prepare(x_eval)
    targets = 2.0 * np.eye(classes)[y] - 1.0
    n, d = x.shape
    if n >= d:
        eigs, q = np.linalg.eigh(x.T @ x)
        lhs, rhs = q, q.T @ (x.T @ targets)
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        lhs, rhs = x.T @ q, q.T @ targets
    out = []
    for l2 in l2_grid:
        w = (lhs / (eigs + float(l2))[None, :]) @ rhs
        out.append(np.mean(np.argmax(x_eval @ w, axis=1) == y_eval))
    return np.asarray(out)


def probe(features_pool, labels_pool, features_test, labels_test, *, shots, seeds, l2_grid):
    """``{k: (mean test accuracy over seeds, [per seed], [chosen λ per seed])}``."""
    classes = int(max(labels_pool.max(), labels_test.max())) + 1
    out = {}
    for k in shots:
        accs, chosen = [], []
        for seed in range(int(seeds)):
            rng = np.random.default_rng(seed)
            by_class = [rng.permutation(np.flatnonzero(labels_pool == c)) for c in range(classes)]
            if min(len(i) for i in by_class) < k + MINIVAL_PER_CLASS:
                raise ConfigError(
                    f"fewshot.shots {k}: the pool has too few images of some class for "
                    f"{k} shots and {MINIVAL_PER_CLASS} to pick λ with"
                )
            fit = np.concatenate([i[:k] for i in by_class])
            val = np.concatenate([i[k : k + MINIVAL_PER_CLASS] for i in by_class])
            on_val = ridge_accuracies(
                features_pool[fit],
                labels_pool[fit],
                features_pool[val],
                labels_pool[val],
                l2_grid,
                classes,
            )
            best = len(l2_grid) - 1 - int(np.argmax(on_val[::-1]))  # ties: the larger λ
            test = ridge_accuracies(
                features_pool[fit],
                labels_pool[fit],
                features_test,
                labels_test,
                [l2_grid[best]],
                classes,
            )
            accs.append(float(test[0]))
            chosen.append(float(l2_grid[best]))
        out[int(k)] = (float(np.mean(accs)), accs, chosen)
    return out


def pixel_baseline(
    image_size: tuple[int, int], channels: int = 1, *, shots=(1, 5, 10, 25), seeds=3, l2_grid=None
) -> dict:
    """The same probe on the digits' resized pixels instead of a model's features: what a
    model's features must beat to have learned anything that transfers. ``l2_grid`` defaults
    to the run config's (4^-3 … 4^7)."""
    grid = [4.0**k for k in range(-3, 8)] if l2_grid is None else list(l2_grid)
    images, labels = digits_images((int(image_size[0]), int(image_size[1])), int(channels))
    pool, test = _splits(labels)
    f = images.reshape(len(images), -1)
    result = probe(
        f[pool], labels[pool], f[test], labels[test], shots=shots, seeds=seeds, l2_grid=grid
    )
    return {f"fewshot/digits_{k}shot": acc for k, (acc, _, _) in result.items()}


def make_probe(config, t) -> Callable[[dict], dict] | None:
    """``params -> {"fewshot/<dataset>_<k>shot": accuracy}`` for the run's ``fewshot`` block,
    or None when it is off. Checked (dataset, shots, an image family) before training starts."""
    block = config.get("fewshot") or {}
    dataset = block.get("dataset", "")
    if not dataset:
        return None
    if dataset not in DATASETS:
        raise ConfigError(f"fewshot.dataset must be one of {DATASETS} or '', got {dataset!r}")
    if t.features_fn is None:
        raise ConfigError(
            f"fewshot probes pre-logit image features; model family {t.spec.family!r} has none"
        )
    shots = [int(k) for k in block.get("shots", ())]
    seeds = int(block.get("seeds", 3))
    grid = [float(v) for v in block.get("l2_grid", ())]
    if not shots or min(shots) < 1 or seeds < 1 or not grid or min(grid) <= 0:
        raise ConfigError(
            "fewshot needs shots >= 1, seeds >= 1 and a non-empty l2_grid of positive values"
        )
    cfg = t.spec.config
    images, labels = digits_images(tuple(cfg.image_size), int(cfg.num_channels))
    pool, test = _splits(labels)
    features = jax.jit(t.features_fn)

    def run(params) -> dict:
        parts = [
            np.asarray(jax.device_get(features(params, images[i : i + 256])), np.float64)
            for i in range(0, len(images), 256)
        ]
        f = np.concatenate(parts)
        result = probe(
            f[pool], labels[pool], f[test], labels[test], shots=shots, seeds=seeds, l2_grid=grid
        )
        return {f"fewshot/{dataset}_{k}shot": acc for k, (acc, _, _) in result.items()}

    return run
