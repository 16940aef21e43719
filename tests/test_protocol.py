"""The paper's continuation protocol: a dense run continued with its optimizer state carried
(``init_opt_state=carry``) is the same run as one never stopped, and ``compare``'s
``protocol=continue`` gives every arm the pre-training schedule, continued."""

import contextlib
import json
import os

import pytest

from sparse_upcycle import compare as compare_lib
from sparse_upcycle.cli import main
from sparse_upcycle.config import load_config
from sparse_upcycle.data import synthetic
from sparse_upcycle.train import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "configs", "train_tiny.py")
COMPARE = os.path.join(HERE, "configs", "compare_tiny.py")
OPTIMIZER = [
    "--config.optimizer.name=adamw",
    "--config.optimizer.schedule=cosine",
    "--config.optimizer.warmup_steps=2",
    "--config.optimizer.decay_steps=6",
    "--config.checkpoint.keep=3",
    "--config.checkpoint.async=False",
]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if r["split"] == "train"}


@contextlib.contextmanager
def _one_batch():
    """Every training step sees the same batch, so a run started later sees what the
    uninterrupted one saw (the data order is the only thing a fresh run does not carry)."""
    original = synthetic.Pipeline.__next__

    def same_batch(self):
        if self.source.split == "train":
            self.next_batch = 0
        return original(self)

    synthetic.Pipeline.__next__ = same_batch
    try:
        yield
    finally:
        synthetic.Pipeline.__next__ = original


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Six steps of AdamW on a cosine schedule, checkpointed at step 3."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    cfg = load_config(f"{TRAIN}:decoder-dense", OPTIMIZER)
    with _one_batch():
        assert train_and_evaluate(cfg, workdir)["status"] == "done"
    return workdir


def _continued(straight, tmp_path, how):
    workdir = str(tmp_path / how)
    cfg = load_config(
        f"{TRAIN}:decoder-dense",
        [
            *OPTIMIZER,
            f"--config.init_from={straight}/checkpoints/3",
            f"--config.init_opt_state={how}",
            "--config.optimizer.step_offset=3",
            "--config.total_steps=3",
        ],
    )
    with _one_batch():
        assert train_and_evaluate(cfg, workdir)["status"] == "done"
    return _rows(workdir)


def test_a_carried_state_continues_the_run_as_if_never_stopped(straight, tmp_path):
    want = _rows(straight)
    got = _continued(straight, tmp_path, "carry")
    for step in (1, 2, 3):
        # the loss before each update, and the rate of that update: steps 4-6 of the run
        assert got[step]["loss"] == pytest.approx(want[step + 3]["loss"], rel=1e-6, abs=1e-7)
        assert got[step]["learning_rate"] == pytest.approx(want[step + 3]["learning_rate"])


def test_a_reset_state_does_not(straight, tmp_path):
    want = _rows(straight)
    got = _continued(straight, tmp_path, "reset")
    assert got[1]["loss"] == pytest.approx(want[4]["loss"], rel=1e-6)  # same parameters
    # AdamW's first update from empty moments is ~lr * sign(g), not the run's update
    assert abs(got[3]["loss"] - want[6]["loss"]) > 1e-4


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--config.init_from=scratch"], "init_opt_state=carry needs an init_from checkpoint"),
        (
            ["--config.init_from={ckpt}", "--config.optimizer.name=adafactor"],
            "its optimizer state does not match this run's optimizer",
        ),
        (["--config.init_from={ckpt}", "--config.init_opt_state=keep"], "init_opt_state must"),
    ],
)
def test_carry_refusals_are_one_line(straight, tmp_path, capsys, extra, says):
    args = ["train", "--config", f"{TRAIN}:decoder-dense", "--workdir", str(tmp_path / "w")]
    args += [*OPTIMIZER[:4], "--config.init_opt_state=carry"]
    args += [e.format(ckpt=f"{straight}/checkpoints/3") for e in extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w").exists()


def test_carry_is_refused_for_an_upcycled_model(straight, tmp_path, capsys):
    args = ["train", "--config", f"{TRAIN}:decoder", "--workdir", str(tmp_path / "w")]
    args += [*OPTIMIZER[:4], f"--config.init_from={straight}/checkpoints/3"]
    assert main([*args, "--config.init_opt_state=carry"]) == 2
    err = capsys.readouterr().err.strip()
    assert "init_opt_state=carry is for a dense continuation" in err, err


def _continue_config(*overrides):
    c = load_config(COMPARE, list(overrides), schema="compare")
    c.protocol = "continue"
    c.pretrain.optimizer.schedule = "rsqrt"
    c.pretrain.optimizer.warmup_steps = 4
    c.pretrain.eval_every = 4
    c.seeds = [0]
    return c


def test_compare_continue_gives_every_arm_the_pretraining_schedule(tmp_path):
    workdir = str(tmp_path / "cmp")
    c = _continue_config()
    c.train.fewshot.dataset = "digits"  # and the few-shot probes ride along (fewshot.py)
    c.train.fewshot.shots = [1, 5]
    c.train.fewshot.seeds = 2
    report = compare_lib.run_compare(c, workdir)
    assert report["protocol"] == "continue"
    pre = report["dense"]
    assert [e["step"] for e in pre["evals"]] == [4, 8]  # the pre-training curve
    pretrain_opt = json.load(open(os.path.join(workdir, "pretrain", "config.json")))["optimizer"]
    for arm, offset, carry in (("dense", 8, "carry"), ("upcycled", 8, "reset")):
        cfg = json.load(open(os.path.join(workdir, arm, "seed_0", "config.json")))
        assert cfg["optimizer"] == {**pretrain_opt, "step_offset": offset}
        assert cfg["init_opt_state"] == carry
    cfg = json.load(open(os.path.join(workdir, "moe_scratch", "seed_0", "config.json")))
    assert cfg["optimizer"] == pretrain_opt  # from step 0, as the dense model was
    # the dense arm's rate goes on where pre-training stopped: lr / sqrt(8 + step)
    rows = _rows(os.path.join(workdir, "dense", "seed_0"))
    lr = pretrain_opt["learning_rate"]
    assert rows[1]["learning_rate"] == pytest.approx(lr / 8**0.5, rel=1e-5)
    assert rows[5]["learning_rate"] == pytest.approx(lr / 12**0.5, rel=1e-5)
    png = open(os.path.join(workdir, "report.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in report["aggregate"].values():
        for point in arm["curve"]:
            assert 0 <= point["fewshot/digits_5shot"] <= 1 and "fewshot/digits_1shot_std" in point
    text = open(os.path.join(workdir, "report.md")).read()
    assert "| arm | extra compute | digits_1shot | digits_5shot |" in text
    assert "| dense checkpoint | 0 |" in text


def test_compare_continue_refuses_an_ended_schedule(tmp_path, capsys):
    c = _continue_config()
    c.pretrain.optimizer.schedule = "cosine"
    with pytest.raises(compare_lib.ConfigError, match="has ended at pre-training's last step"):
        compare_lib.run_compare(c, str(tmp_path / "cmp"))


PLAIN_MOE = [  # the tiny decoder's MoE without its shared expert (method copy builds none)
    "--config.model.moe.num_shared_experts=0",
    "--config.model.moe.shared_expert_gate=False",
]


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the raw Orbax read below
def test_tile_repeats_the_dense_runs_moments_over_the_experts(straight, tmp_path):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from sparse_upcycle import sharding
    from sparse_upcycle.checkpoints.tree import path_str
    from sparse_upcycle.init_from import open_init_source, tiled_opt_state
    from sparse_upcycle.training import build_training

    ckpt = f"{straight}/checkpoints/3"
    over = [*OPTIMIZER, f"--config.init_from={ckpt}", "--config.upcycle.optimizer=tile"]
    cfg = load_config(f"{TRAIN}:decoder", [*over, *PLAIN_MOE])
    source = open_init_source(cfg)
    assert source is not None
    t = build_training(cfg, source, sharding.mesh_from_config(cfg.mesh))
    state = tiled_opt_state(cfg, source, t.abstract_opt, t.state_sh["opt_state"])
    got = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}
    # the dense run's state, read whole by Orbax itself
    raw = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt, "state"))["opt_state"]
    dense = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(raw)}
    experts = routers = 0
    for key, value in got.items():
        if "/router/" in key:
            assert not value.any(), key
            routers += 1
        elif "/expert/" in key:
            want = dense[key.replace("/expert/", "/", 1)]
            assert value.shape == (4, *want.shape)
            for e in range(4):
                np.testing.assert_array_equal(value[e], want)
            experts += 1
        elif key == "2/count":  # optax.adamw = chain(scale_by_adam, weight decay, schedule)
            assert value == 0  # the schedule's counter: step_offset alone places the schedule
        else:
            np.testing.assert_array_equal(value, dense[key])
    assert experts > 0 and routers > 0
    assert got["0/count"] == dense["0/count"] == 3  # Adam's bias correction goes on
    # and a run starts from it
    cfg = load_config(f"{TRAIN}:decoder", [*over, *PLAIN_MOE, "--config.total_steps=2"])
    assert train_and_evaluate(cfg, str(tmp_path / "moe"))["status"] == "done"


def test_tile_from_another_optimizer_is_refused(straight, tmp_path, capsys):
    args = ["train", "--config", f"{TRAIN}:decoder", "--workdir", str(tmp_path / "w")]
    args += [f"--config.init_from={straight}/checkpoints/3", "--config.upcycle.optimizer=tile"]
    assert main([*args, *PLAIN_MOE]) == 2  # the tiny config trains with Adafactor
    err = capsys.readouterr().err.strip()
    assert "has no counterpart in the dense run's state" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()
