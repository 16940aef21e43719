"""Few-shot linear probes: the ridge solution against scikit-learn's, the digits data, the
refusals, and the probe at every evaluation of a ViT run."""

import json
import os

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from sparse_upcycle import fewshot
from sparse_upcycle.cli import main
from sparse_upcycle.config import ConfigError, load_config
from sparse_upcycle.train import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "configs", "train_tiny.py")


def _prepared(x, fit):
    mean, std = fit.mean(0, keepdims=True), fit.std(0, keepdims=True) + 1e-5
    x = (x - mean) / std
    return np.concatenate([x, np.full((len(x), 1), fewshot.BIAS_FEATURE)], axis=1)


@pytest.mark.parametrize("n_per_class", [2, 30])  # fewer points than features, and more
def test_ridge_predictions_match_scikit_learn(n_per_class):
    rng = np.random.default_rng(0)
    classes, dim = 5, 24
    centers = rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centers[y] + 1.5 * rng.normal(size=(len(y), dim))
    y_eval = rng.integers(0, classes, 200)
    x_eval = centers[y_eval] + 1.5 * rng.normal(size=(200, dim))
    grid = [1e-2, 1.0, 64.0, 4096.0]
    got = fewshot.ridge_accuracies(x, y, x_eval, y_eval, grid, classes)
    for l2, acc in zip(grid, got, strict=True):
        # sklearn's Ridge on the same design (standardised features + the bias column) and
        # {-1, 1} targets, no intercept of its own: min ||XW - Y||² + λ||W||²
        model = Ridge(alpha=l2, fit_intercept=False, solver="svd")
        model.fit(_prepared(x, x), 2.0 * np.eye(classes)[y] - 1.0)
        want = np.mean(np.argmax(model.predict(_prepared(x_eval, x)), axis=1) == y_eval)
        assert acc == pytest.approx(want)
    assert got.max() > 0.4  # twice chance: the clusters are learned even from 2 shots


def test_digits_are_the_bundled_dataset_resized():
    images, labels = fewshot.digits_images((28, 28), 3)
    assert images.shape == (1797, 28, 28, 3) and images.dtype == np.float32
    assert set(labels.tolist()) == set(range(10))
    assert abs(float(images.mean())) < 1e-4 and float(images.std()) == pytest.approx(1, rel=1e-3)
    pool, test = fewshot._splits(labels)
    assert len(test) == fewshot.TEST_IMAGES and not set(pool) & set(test)
    assert len(pool) + len(test) == 1797


def test_raw_pixels_are_a_sane_baseline():
    """On the digits' own pixels the probe is far above chance, and more shots help."""
    images, labels = fewshot.digits_images((8, 8), 1)
    pool, test = fewshot._splits(labels)
    f = images.reshape(len(images), -1)
    out = fewshot.probe(
        f[pool], labels[pool], f[test], labels[test], shots=[1, 10], seeds=2, l2_grid=[1.0, 64.0]
    )
    assert 0.3 < out[1][0] < out[10][0] and out[10][0] > 0.8
    base = fewshot.pixel_baseline((8, 8), shots=[1, 10], seeds=2, l2_grid=[1.0, 64.0])
    assert base == {"fewshot/digits_1shot": out[1][0], "fewshot/digits_10shot": out[10][0]}


def test_too_many_shots_are_refused():
    images, labels = fewshot.digits_images((8, 8), 1)
    pool, test = fewshot._splits(labels)
    f = images.reshape(len(images), -1)
    with pytest.raises(ConfigError, match="too few images of some class"):
        fewshot.probe(
            f[pool], labels[pool], f[test], labels[test], shots=[95], seeds=1, l2_grid=[1]
        )


PROBE = [
    "--config.fewshot.dataset=digits",
    "--config.fewshot.shots=[1,5]",
    "--config.fewshot.seeds=2",
]


def test_a_vit_run_reports_the_probe_at_every_evaluation(tmp_path):
    workdir = str(tmp_path / "vit")
    cfg = load_config(f"{TRAIN}:vit-dense", [*PROBE, "--config.eval_at=[0,3]"])
    assert train_and_evaluate(cfg, workdir)["status"] == "done"
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = {r["step"]: r for r in rows if r["split"] == "eval"}
    assert sorted(evals) == [0, 3, 6]
    for r in evals.values():
        assert 0.0 <= r["fewshot/digits_1shot"] <= 1.0 and 0.0 <= r["fewshot/digits_5shot"] <= 1.0
    assert evals[6]["fewshot/digits_5shot"] > 0.2  # random features of a ViT already beat chance


@pytest.mark.parametrize(
    "config, extra, says",
    [
        ("decoder-dense", PROBE, "model family 'decoder' has none"),
        ("vit-dense", ["--config.fewshot.dataset=cifar"], "fewshot.dataset must be one of"),
        ("vit-dense", [*PROBE, "--config.fewshot.shots=[0]"], "fewshot needs shots >= 1"),
    ],
)
def test_refusals_are_one_line(tmp_path, capsys, config, extra, says):
    args = ["train", "--config", f"{TRAIN}:{config}", "--workdir", str(tmp_path / "w"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w").exists()
