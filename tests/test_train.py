"""The training loop: exact resume after SIGKILL and SIGTERM, NaN stops, init_from paths and
meshes. Runs use tests/configs/train_tiny.py."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import cli
from sparse_upcycle.checkpoints.t5x import write_t5x
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.config import load_config
from sparse_upcycle.models import t5
from sparse_upcycle.train import TrainingError, train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "train_tiny.py")
UPCYCLE_CONFIG = os.path.join(HERE, os.pardir, "configs", "upcycle_tiny.py")


def _losses(workdir, split="train", key="loss"):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == split:
                out[rec["step"]] = rec[key]
    return out


def _config(arg="t5", *overrides):
    return load_config(f"{CONFIG}:{arg}", list(overrides))


# A subprocess that trains with its data pipeline slowed down, so that signals land mid-run,
# and that touches <workdir>/step_<n> as it takes each batch.
SLOW_TRAIN = textwrap.dedent(
    """
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    from sparse_upcycle import cli
    from sparse_upcycle.data import synthetic
    workdir = sys.argv[sys.argv.index("--workdir") + 1]
    nxt = synthetic.Pipeline.__next__
    def slow_next(self):
        if self.source.split == "train":
            os.makedirs(workdir, exist_ok=True)
            open(os.path.join(workdir, f"step_{self.next_batch}"), "w").close()
            time.sleep(0.3)
        return nxt(self)
    synthetic.Pipeline.__next__ = slow_next
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _run_train(workdir, *extra, wait_for=None, send=None):
    args = ["train", "--config", f"{CONFIG}:t5", "--workdir", str(workdir)]
    args += ["--config.total_steps=20", "--config.checkpoint.every=10", *extra]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if wait_for is not None:
        deadline = time.time() + 300
        paths = [wait_for] if isinstance(wait_for, str) else wait_for
        while (
            not all(os.path.exists(os.path.join(workdir, p)) for p in paths)
            and time.time() < deadline
        ):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, send)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
def test_interrupted_runs_reproduce_the_uninterrupted_losses(tmp_path):
    straight = tmp_path / "straight"
    code, _, err = _run_train(straight)
    assert code == 0, err[-2000:]
    want = _losses(straight)
    assert sorted(want) == list(range(1, 21))

    # 20 steps straight vs SIGKILL once step 12's batch is taken (after the step-10
    # checkpoint), then a rerun that resumes and goes on to 20: identical per-step losses.
    killed = tmp_path / "killed"
    code, _, _ = _run_train(killed, wait_for=["checkpoints/10", "step_12"], send=signal.SIGKILL)
    assert code == -signal.SIGKILL
    steps = sorted(int(p) for p in os.listdir(killed / "checkpoints") if p.isdigit())
    assert steps == [10]
    code, _, err = _run_train(killed)
    assert code == 0, err[-2000:]
    assert "resumed" in err
    assert _losses(killed) == want  # bit-identical per-step losses

    # SIGTERM: the run saves where it is and exits cleanly; the rerun finishes the job.
    termed = tmp_path / "termed"
    code, out, err = _run_train(termed, wait_for="step_6", send=signal.SIGTERM)
    assert code == 0, err[-2000:]
    assert json.loads(out)["status"] == "preempted" and "SIGTERM: saved step" in err
    code, _, err = _run_train(termed)
    assert code == 0, err[-2000:]
    assert _losses(termed) == want


def test_nan_stops_naming_the_step_and_last_checkpoint(tmp_path, monkeypatch):
    from sparse_upcycle.data import synthetic

    example = synthetic.SyntheticSource.example

    def poisoned(self, index):
        out = example(self, index)
        if self.split == "train" and index // 8 == 4:  # the fifth batch
            out["image"] = out["image"] * np.nan
        return out

    monkeypatch.setattr(synthetic.SyntheticSource, "example", poisoned)
    with pytest.raises(TrainingError, match=r"step 5: .*NaN.*Last good checkpoint: step 3"):
        train_and_evaluate(_config("vit"), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # nothing non-finite saved


def test_timing_keeps_compilation_and_evaluation_out_of_the_step_time(tmp_path, monkeypatch):
    """Evaluation made slow on purpose (0.4 s a batch) lands in ``eval_s``, not in the logged
    step times or ``train_s``; the first step (compilation) is reported on its own."""
    from sparse_upcycle.data import synthetic

    example = synthetic.SyntheticSource.example

    def slow_validation(self, index):
        if self.split == "validation" and index % 8 == 0:  # once per batch of 8
            time.sleep(0.4)
        return example(self, index)

    monkeypatch.setattr(synthetic.SyntheticSource, "example", slow_validation)
    config = _config("vit", "--config.eval_every=2", "--config.log_every=2")
    timing = train_and_evaluate(config, str(tmp_path))["timing"]
    assert timing["steps_timed"] == 5  # steps 2..6
    assert timing["eval_s"] >= 3 * 0.4  # evaluations at steps 2, 4 and 6
    assert timing["train_s"] > 0 and timing["first_step_s"] > 0
    assert timing["checkpoint_s"] > 0  # saves at 3 and 6
    seconds = _losses(str(tmp_path), key="step_seconds")
    assert sorted(seconds) == [2, 4, 6]
    # Logged step times cover steps 2, 3-4, 5-6 and leave the evaluations out: with them in,
    # these would add up to at least 3 × 0.4 s more than train_s.
    logged = seconds[2] * 1 + seconds[4] * 2 + seconds[6] * 2
    assert logged <= timing["train_s"] + 0.2, (logged, timing)


def test_cli_reports_a_missing_init_checkpoint(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--config",
            f"{CONFIG}:t5",
            "--workdir",
            str(tmp_path / "w"),
            f"--config.init_from={tmp_path / 'nothing'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1


DENSE_STEP = 500  # the step of the dense_t5x checkpoint


def _dense_t5_params():
    """The parameters of the ``dense_t5x`` checkpoint, flat."""
    model = t5.T5(t5.config("tiny"), rngs=nnx.Rngs(3))
    return flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))


@pytest.fixture(scope="module")
def dense_t5x(tmp_path_factory):
    """A dense tiny T5 in T5X format with Adafactor-style slots (step 500): a factored
    ``v_row``/``v_col`` (and a ``(1,)`` placeholder ``v``) for each matrix, a full ``v`` for
    every other parameter."""
    src = str(tmp_path_factory.mktemp("dense") / f"checkpoint_{DENSE_STEP}")
    params = _dense_t5_params()
    rng = np.random.default_rng(0)
    slots = {}
    for path, p in params.items():
        if p.ndim == 2:
            slots[f"{path}/v_row"] = rng.random(p.shape[:1]).astype(np.float32)
            slots[f"{path}/v_col"] = rng.random(p.shape[1:]).astype(np.float32)
            slots[f"{path}/v"] = np.zeros((1,), np.float32)
        else:
            slots[f"{path}/v"] = rng.random(p.shape).astype(np.float32)
    write_t5x(src, params, step=DENSE_STEP, param_states=slots)
    return src


def test_online_upcycling_equals_offline_upcycling(dense_t5x, tmp_path, capsys):
    moe_dir = str(tmp_path / "moe")
    assert (
        cli.main(["upcycle", "--config", f"{CONFIG}:t5", "--src", dense_t5x, "--dst", moe_dir]) == 0
    )
    overrides = ["--config.total_steps=2", "--config.checkpoint.every=100"]
    online = train_and_evaluate(
        _config("t5", f"--config.init_from={dense_t5x}", *overrides), str(tmp_path / "on")
    )
    offline = train_and_evaluate(
        _config("t5", f"--config.init_from={moe_dir}", *overrides), str(tmp_path / "off")
    )
    assert online["status"] == offline["status"] == "done"
    assert _losses(tmp_path / "on") == _losses(tmp_path / "off")


def _direct_dense_loss(config, dense_t5x) -> float:
    """The loss of the dense T5X checkpoint on the first validation batch, computed from its
    tensors directly (no trainer)."""
    from sparse_upcycle.checkpoints.open import open_checkpoint
    from sparse_upcycle.data import make_pipeline
    from sparse_upcycle.losses import cross_entropy_loss
    from sparse_upcycle.models import build_model

    source = open_checkpoint(dense_t5x)
    model = build_model("t5", t5.config("tiny"), {k: source.read(k) for k in source.keys()})
    batch = next(make_pipeline(config.data, "t5", t5.config("tiny"), "validation"))
    logits, _ = model(
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        decoder_mask=batch["decoder_target_tokens"] > 0,
    )
    total, z, weights = cross_entropy_loss(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    )
    return float(total / weights)


def test_dense_continue_starts_from_the_dense_function(dense_t5x, tmp_path):
    """Loading a dense checkpoint as is: with a zero learning rate the eval loss equals the
    loss of the dense model computed directly from the T5X tensors."""
    config = _config(
        "t5-dense",
        f"--config.init_from={dense_t5x}",
        "--config.total_steps=1",
        "--config.optimizer.learning_rate=0.0",
        "--config.eval_every=1",
    )
    result = train_and_evaluate(config, str(tmp_path))
    np.testing.assert_allclose(
        result["eval"]["loss"], _direct_dense_loss(config, dense_t5x), rtol=1e-5
    )


def test_eval_at_zero_evaluates_the_initial_parameters(dense_t5x, tmp_path):
    """``eval_at`` 0 evaluates before the first step: with a real learning rate, the step-0
    row is the dense checkpoint's loss and the step-2 row has moved away from it."""
    config = _config(
        "t5-dense",
        f"--config.init_from={dense_t5x}",
        "--config.total_steps=2",
        "--config.eval_at=[0]",
        "--config.eval_every=0",
    )
    train_and_evaluate(config, str(tmp_path))
    evals = _losses(tmp_path, split="eval")
    assert sorted(evals) == [0, 2]
    want = _direct_dense_loss(config, dense_t5x)
    np.testing.assert_allclose(evals[0], want, rtol=1e-5)
    assert abs(evals[2] - want) > 1e-3


def test_tiled_optimizer_slots_reach_the_optax_state(dense_t5x, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="sparse_upcycle.train")
    config = _config(
        "t5",
        f"--config.init_from={dense_t5x}",
        "--config.upcycle.optimizer=tile",
        "--config.total_steps=1",
    )
    train_and_evaluate(config, str(tmp_path))
    (line,) = [r.getMessage() for r in caplog.records if "optimizer slots" in r.getMessage()]
    got = re.search(
        r"optimizer slots: (\d+) loaded, (\d+) skipped, \d+ params left at init; "
        r"second-moment count set to (\d+)$",
        line,
    )
    assert got, line
    # What must load, from the dense checkpoint's shapes. optax factors a parameter's second
    # moment when its second-largest dim is >= min_dim_size_to_factor (an expert kernel
    # [E, d, f] per expert, i.e. on the dense [d, f] the surgeon tiled). A full T5X ``v`` loads
    # into a full optax ``v`` (1 slot); a factored pair loads into a factored optax state
    # (2 slots) and is skipped when optax keeps the full ``v`` (2 slots); placeholders count
    # for neither. Every dense parameter is in the MoE model, tiled or as is.
    opt = config.optimizer
    loaded = skipped = 0
    for p in _dense_t5_params().values():
        assert p.ndim in (1, 2), p.shape  # the fixture's two kinds of slots
        if p.ndim == 1:
            loaded += 1
        elif opt.factored and sorted(p.shape)[-2] >= opt.min_dim_size_to_factor:
            loaded += 2
        else:
            skipped += 2
    assert loaded > 0
    assert (int(got[1]), int(got[2]), int(got[3])) == (loaded, skipped, DENSE_STEP), line


@pytest.mark.parametrize("family", ["t5", "vit", "decoder"])
def test_meshes_give_the_same_losses(family, tmp_path):
    """Data-parallel (8,1,1) vs expert-parallel (2,4,1) vs (2,2,2) with tensor parallelism."""
    runs = {}
    for mesh in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        workdir = str(tmp_path / "_".join(map(str, mesh)))
        d, e, m = mesh
        config = _config(
            family,
            "--config.total_steps=3",
            "--config.checkpoint.every=100",
            f"--config.mesh.data={d}",
            f"--config.mesh.expert={e}",
            f"--config.mesh.model={m}",
        )
        train_and_evaluate(config, workdir)
        runs[mesh] = _losses(workdir)
    base = runs[(8, 1, 1)]
    for mesh, losses in runs.items():
        for step, loss in base.items():
            assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (mesh, step)
