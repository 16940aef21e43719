"""``inspect --routing``: the recorded assignments agree with the router's own counts, the
mutual information with its closed form, and the report covers both kinds of data."""

import json
import math
import os

import jax
import numpy as np
import pytest

from sparse_upcycle import sharding
from sparse_upcycle.cli import main
from sparse_upcycle.config import load_config
from sparse_upcycle.data import make_pipeline
from sparse_upcycle.inspect_routing import _load_params, _mutual_information, inspect_routing
from sparse_upcycle.train import train_and_evaluate
from sparse_upcycle.training import build_training

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "configs", "train_tiny.py")
# the tiny decoder's MoE without its shared expert (method copy builds none)
PLAIN_MOE = [
    "--config.model.moe.num_shared_experts=0",
    "--config.model.moe.shared_expert_gate=False",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense decoder, and an upcycled MoE decoder and ViT trained a few steps."""
    root = tmp_path_factory.mktemp("routing")
    dense = str(root / "dense")
    assert train_and_evaluate(load_config(f"{TRAIN}:decoder-dense"), dense)["status"] == "done"
    moe = str(root / "moe")
    over = [f"--config.init_from={dense}/checkpoints/6", "--config.total_steps=3", *PLAIN_MOE]
    assert train_and_evaluate(load_config(f"{TRAIN}:decoder", over), moe)["status"] == "done"
    vit = str(root / "vit")
    assert train_and_evaluate(load_config(f"{TRAIN}:vit"), vit)["status"] == "done"
    return {"dense": dense, "moe": moe, "vit": vit}


def _decoder_config(runs):
    over = [f"--config.init_from={runs['dense']}/checkpoints/6", *PLAIN_MOE]
    return load_config(f"{TRAIN}:decoder", over)


def test_loads_equal_the_routers_own_counts(runs, tmp_path):
    config = _decoder_config(runs)
    end = f"{runs['moe']}/checkpoints/3"
    report = inspect_routing(config, end, start="init", batches=1, out=str(tmp_path))
    # the router's own per-layer load (routing.RouterMetrics.expert_load, counted inside the
    # routing code) on the same validation batch, through the loss
    t = build_training(config, None, sharding.mesh_from_config(config.mesh))
    batch = next(make_pipeline(config.data, "decoder", t.spec.config, "validation"))
    for label, path in (("end", end), ("start", "init")):
        params = _load_params(config, path, t)
        _, metrics = jax.jit(lambda p, b: t.loss_fn(p, b, None, False))(params, batch)
        want = np.asarray(metrics["router/expert_load"])
        layers = report["checkpoints"][label]["layers"]
        for row, name in enumerate(report["layers"]):
            np.testing.assert_allclose(layers[name]["load"], want[row], atol=1e-6)
        dropped = np.mean([layers[n]["dropped_fraction"] for n in report["layers"]])
        assert dropped == pytest.approx(float(metrics["router/dropped_fraction"]), abs=1e-6)
    start = report["checkpoints"]["start"]["layers"]
    end_layers = report["checkpoints"]["end"]["layers"]
    for name in report["layers"]:
        assert start[name]["expert_spread"] == 0.0  # copies of the dense MLP
        assert "expert_drift" not in start[name]
        assert end_layers[name]["expert_spread"] > 0 and end_layers[name]["expert_drift"] > 0
        assert start[name]["router_kernel_rms"] > 0
    assert any(start[n]["load"] != end_layers[n]["load"] for n in report["layers"])
    for name in report["layers"]:
        r = end_layers[name]
        # top-2 routing with capacity: 2 assignments per real token, less those dropped
        tokens = config.data.batch_size * config.data.seq_len
        assert r["assignments"] == pytest.approx(2 * tokens * (1 - r["dropped_fraction"]), abs=1)
        top = r["top_tokens"]
        assert sum(len(v) > 0 for v in top.values()) >= 1
        shares = [s for v in top.values() for _, _, s in v]
        assert all(0 < s <= 1 for s in shares)
    files = report["files"]
    assert json.load(open(files["json"]))["layers"] == report["layers"]
    assert "| layers_1 | start |" in open(files["md"]).read()
    assert open(files["png"], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_loss_equals_trains_own_evaluation(runs, tmp_path):
    # the run's last evaluation (loop.py, its own eval step) on the same validation batches
    config = _decoder_config(runs)
    with open(f"{runs['moe']}/metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r.get("split") == "eval"]
    assert evals and evals[-1]["step"] == 3
    end = f"{runs['moe']}/checkpoints/3"
    report = inspect_routing(config, end, batches=config.eval_steps, out=str(tmp_path))
    got = report["checkpoints"]["end"]["validation"]
    assert got["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(evals[-1]["accuracy"], abs=1e-6)
    assert f"- end: loss {got['loss']:.4f}" in open(report["files"]["md"]).read()


def test_images_give_a_class_by_expert_matrix(runs, tmp_path):
    config = load_config(f"{TRAIN}:vit")
    report = inspect_routing(config, f"{runs['vit']}/checkpoints/6", batches=2, out=str(tmp_path))
    for name in report["layers"]:
        r = report["checkpoints"]["end"]["layers"][name]
        m = np.asarray(r["class_expert_counts"])
        assert m.shape[1] == len(r["load"]) and m.sum() == r["assignments"]
        np.testing.assert_allclose(m.sum(0) / m.sum(), r["load"], atol=1e-9)


def test_mutual_information_matches_its_closed_form():
    # expert = class (8 classes, uniform): I = H(E) = 3 bits, ratio 1
    mi, ratio, _ = _mutual_information(np.eye(8) * 100)
    assert mi == pytest.approx(3.0) and ratio == pytest.approx(1.0)
    # independent: the joint is the product of its marginals
    px, pe = np.array([1, 2, 3, 4]), np.array([5, 1, 2])
    mi, ratio, bias = _mutual_information(np.outer(px, pe) * 10)
    assert mi == pytest.approx(0.0, abs=1e-12) and ratio == pytest.approx(0.0, abs=1e-12)
    assert bias == pytest.approx((4 - 1) * (3 - 1) / (2 * 10 * px.sum() * pe.sum() * math.log(2)))
    # two classes, each split between its own two experts: I = 1 bit of H(E) = 2 bits
    mi, ratio, _ = _mutual_information(np.array([[5, 5, 0, 0], [0, 0, 5, 5]]))
    assert mi == pytest.approx(1.0) and ratio == pytest.approx(0.5)


@pytest.mark.parametrize(
    "extra, says",
    [
        ([], "inspect --routing needs --config"),
        (["--config", f"{TRAIN}:decoder-dense"], "has no MoE layer"),
        (["--config", f"{TRAIN}:decoder", "--config.model.scan_layers=True"], "scan_layers"),
        (["--config", f"{TRAIN}:decoder", "--batches", "0"], "--batches must be >= 1"),
        (["--config", f"{TRAIN}:decoder"], "does not match the config's model"),
    ],
)
def test_refusals_are_one_line(runs, tmp_path, capsys, extra, says):
    args = ["inspect", f"{runs['moe']}/checkpoints/3", "--routing", "--out", str(tmp_path / "o")]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_routing_flags_need_routing(runs, capsys):
    assert main(["inspect", f"{runs['moe']}/checkpoints/3", "--batches", "2"]) == 2
    assert "go with --routing" in capsys.readouterr().err


def test_a_compare_runs_config_json_is_read(runs, tmp_path, capsys):
    config = _decoder_config(runs).to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, default=str))
    out = tmp_path / "o"
    args = ["inspect", f"{runs['moe']}/checkpoints/3", "--routing", "--config", str(path)]
    assert main([*args, "--out", str(out), "--batches", "1"]) == 0
    assert (out / "routing.json").exists()
