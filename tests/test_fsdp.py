"""FSDP (ZeRO-3): parameters and optimizer state split over the ``fsdp`` mesh axis.

On the 8 fake CPU devices of conftest.py: the loss and every gradient of the tiny T5 and decoder
MoE configs on (fsdp=4, expert=2) and (fsdp=2, expert=2, model=2) equal one device's; the
state really is split; ``plan``'s per-device parameter bytes are divided as the layout
rule says (computed here from the shapes, not by the planner); and a training run on
(fsdp=4, expert=2) resumed on a mesh without FSDP reproduces an uninterrupted run's losses."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_upcycle import plan, sharding
from sparse_upcycle.config import ConfigError, check_command, load_config
from sparse_upcycle.data import make_pipeline
from sparse_upcycle.train import train_and_evaluate
from sparse_upcycle.training import build_training

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "train_tiny.py")
FSDP_MESHES = {
    "fsdp4_expert2": ["--config.mesh.fsdp=4", "--config.mesh.expert=2"],
    "fsdp2_expert2_model2": [
        "--config.mesh.fsdp=2",
        "--config.mesh.expert=2",
        "--config.mesh.model=2",
    ],
}


def _config(family, *overrides):
    return load_config(f"{CONFIG}:{family}", list(overrides))


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_close(got, want, what):
    """Relative to the largest |value| of the leaf (1e-5, fp32)."""
    got, want = np.asarray(got), np.asarray(want)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max())
    assert err <= 1e-5 * scale, (what, err, scale)


# --------------------------------------------------------------------------------------------
# Mesh and rules.
# --------------------------------------------------------------------------------------------


def test_mesh_axes_and_sizes():
    mesh = sharding.make_mesh(expert=2, fsdp=4)
    assert mesh.axis_names == ("data", "fsdp", "expert", "model")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 2, "model": 1}
    # fsdp=1: no fsdp axis, the mesh every earlier run had
    assert sharding.make_mesh(expert=2).axis_names == ("data", "expert", "model")
    assert dict(sharding.make_mesh(2, 2, 1, fsdp=-1).shape)["fsdp"] == 2
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(2, 2, 1, fsdp=4)
    with pytest.raises(ValueError, match="positive integer or -1"):
        sharding.make_mesh(fsdp=0)
    # The switch: every data-parallel device of the data axis becomes an fsdp device.
    sizes = sharding.mesh_sizes({"data": -1, "expert": 2, "shard_params_over_data": True}, 8)
    assert sizes == {"data": 1, "fsdp": 4, "expert": 2, "model": 1}
    assert sharding.mesh_sizes({"data": 2, "fsdp": 2, "expert": 2}, 8)["fsdp"] == 2
    with pytest.raises(ValueError, match="shard_params_over_data"):
        sharding.mesh_sizes({"shard_params_over_data": 1}, 8)


def test_specs_on_an_fsdp_mesh():
    mesh = sharding.make_mesh(2, 2, 1, fsdp=2)
    spec = sharding.logical_to_spec
    assert spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp", "expert"), None)
    assert spec(("batch_no_expert", "expert"), (8, 4), mesh) == P(("data", "fsdp"), "expert")
    assert spec(("expert", "embed", "mlp"), (4, 32, 64), mesh) == P("expert", "fsdp", "model")
    assert spec(("vocab", "embed"), (128, 32), mesh) == P("model", "fsdp")
    # Activations keep d whole: the batch took fsdp first.
    assert spec(("batch", None, "embed"), (8, 4, 32), mesh) == P(
        ("data", "fsdp", "expert"), None, None
    )
    # d not divisible by fsdp: replicated (jit refuses uneven shards).
    assert spec(("embed", "mlp"), (33, 64), mesh) == P(None, "model")
    assert sharding.batch_sharding(mesh, 2).spec == P(("data", "fsdp", "expert"), None)
    assert sharding.data_parallel_size(mesh) == 8


def test_activations_and_used_weights_keep_d_whole():
    """Inside the step: a constrained activation never has d on ``fsdp``, even where its batch
    dim is too small to take the axis (a decoder stack with fewer routing groups than devices);
    a weight as used (``gathered``) is whole over ``fsdp`` and still split over ``model``."""
    mesh = sharding.make_mesh(1, 2, 2, fsdp=2)
    assert sharding.logical_to_spec(("batch", None, "embed"), (3, 4, 32), mesh) == P(
        None, None, "fsdp"
    )  # what the table alone gives; constrain must not pass it on

    class W:  # the two things ``gathered`` reads of an nnx.Param
        def __init__(self, value, axes):
            self.value, self.axes = value, axes

        def __getitem__(self, _):
            return self.value

        def get_metadata(self):
            return {"out_sharding": self.axes}

    def step(x, w):
        y = sharding.constrain(x, ("batch", None, "embed"))
        return y, sharding.gathered(W(w, ("embed", "mlp")))

    w_sharding = NamedSharding(mesh, P("fsdp", "model"))
    x = jax.device_put(np.ones((3, 4, 32), np.float32), NamedSharding(mesh, P()))
    w = jax.device_put(np.ones((32, 64), np.float32), w_sharding)
    with jax.set_mesh(mesh):
        y, used = jax.jit(step)(x, w)
    assert "fsdp" not in str(y.sharding.spec)
    assert used.sharding.spec == P(None, "model")
    # No mesh, or no fsdp axis: both are the identity.
    assert sharding.gathered(W(w, ("embed", "mlp"))) is w


def test_batch_must_divide_data_times_fsdp_times_expert():
    config = _config("t5", "--config.mesh.fsdp=4", "--config.data.batch_size=4")
    with pytest.raises(ConfigError, match=r"batch_size=4 must be divisible by the 8 data-par"):
        check_command(config, "train")
    check_command(_config("t5", "--config.mesh.fsdp=4"), "train")  # batch 8: fine
    with pytest.raises(ConfigError, match="shard_params_over_data"):
        _config("t5", "--config.mesh.shard_params_over_data=1")


# --------------------------------------------------------------------------------------------
# Loss and gradients == one device.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["t5", "decoder"])
def reference(request):
    """One device, no mesh: the params, a batch, the loss and every gradient."""
    family = request.param
    config = _config(family)
    one = sharding.make_mesh(devices=jax.devices()[:1])
    t = build_training(config, None, one)
    params = jax.device_get(t.init_state(0)["params"])
    data = make_pipeline(config.data, t.spec.family, t.spec.config, "train")
    batch = next(data)
    value_and_grad = jax.value_and_grad(lambda p, b, k: t.loss_fn(p, b, k, True), has_aux=True)
    rng = jax.random.key(3)
    (loss, _), grads = jax.jit(value_and_grad)(params, batch, rng)
    return family, params, batch, float(loss), jax.device_get(grads)


@pytest.mark.parametrize("mesh_name", list(FSDP_MESHES))
def test_loss_and_grads_match_one_device(reference, mesh_name):
    family, params, batch, ref_loss, ref_grads = reference
    config = _config(family, *FSDP_MESHES[mesh_name])
    mesh = sharding.mesh_from_config(config.mesh)
    t = build_training(config, None, mesh)
    fsdp = mesh.shape["fsdp"]
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    replicated = NamedSharding(mesh, P())

    def step(params, batch, seed):
        fn = jax.value_and_grad(lambda p: t.loss_fn(p, batch, jax.random.key(seed), True)[0])
        return fn(params)

    with jax.set_mesh(mesh):
        placed = sharding.shard_tree(params, t.param_sh)
        placed_batch = sharding.shard_tree(batch, batch_sh)
        seed = sharding.shard_tree(np.uint32(3), replicated)
        jitted = jax.jit(
            step,
            in_shardings=(t.param_sh, batch_sh, replicated),
            out_shardings=(replicated, t.param_sh),
        )
        compiled = jitted.lower(placed, placed_batch, seed).compile()
        loss, grads = compiled(placed, placed_batch, seed)

    # jax.random.key(3) with a uint32 seed is the same key as with the Python int.
    _assert_close(loss, ref_loss, "loss")
    flat_ref, flat_params = _flat(ref_grads), _flat(placed)
    for path, g in _flat(grads).items():
        _assert_close(g, flat_ref[path], path)
    # Parameters and their gradients really are split over fsdp on d (the model width), and
    # a device holds 1/fsdp of such a leaf (1/(fsdp·expert) of an expert kernel).
    split = [p for p, x in flat_params.items() if "fsdp" in str(x.sharding.spec)]
    # Every matrix but T5's relative-position tables (no d); vectors (norm scales) stay whole.
    matrices = [p for p, x in flat_params.items() if x.ndim >= 2 and "relpos" not in p]
    assert sorted(split) == sorted(matrices)
    for path in split:
        x = flat_params[path]
        shard = x.addressable_shards[0].data.shape
        assert math.prod(x.shape) // math.prod(shard) >= fsdp, (path, x.shape, shard)
        assert "fsdp" in str(_flat(grads)[path].sharding.spec), path
    wi = next(p for p in split if "['expert']['wi_0']" in p)
    assert flat_params[wi].sharding.spec[:2] == ("expert", "fsdp")
    # The weights are gathered where they are used (ZeRO-3), none is resident whole.
    hlo = compiled.as_text() or ""
    assert " all-gather(" in hlo or "all-gather-start(" in hlo


def test_optimizer_state_follows_the_split_params():
    config = _config("t5", *FSDP_MESHES["fsdp4_expert2"])
    mesh = sharding.mesh_from_config(config.mesh)
    t = build_training(config, None, mesh)  # the tiny config trains with Adafactor
    opt_sh = jax.tree.leaves(t.state_sh["opt_state"])
    opt = jax.tree.leaves(t.abstract_opt)
    assert any("fsdp" in str(sh.spec) for sh in opt_sh)
    whole = sum(x.size * x.dtype.itemsize for x in opt)
    per_device = sum(
        math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
        for x, sh in zip(opt, opt_sh, strict=True)
    )
    assert per_device <= whole / 2, (per_device, whole)


# --------------------------------------------------------------------------------------------
# plan: per-device bytes.
# --------------------------------------------------------------------------------------------


def test_plan_divides_parameter_bytes():
    config = _config("decoder", *FSDP_MESHES["fsdp4_expert2"])
    r = plan.plan(config, 8, 2**30)
    assert r["mesh"] == {"data": 1, "fsdp": 4, "expert": 2, "model": 1}
    # Reference from the shapes and the layout rule: every matrix has a d (split 4 ways over
    # fsdp), the expert leaves are split 2 ways more on E; vectors (norm scales) stay whole.
    one = build_training(_config("decoder"), None, sharding.make_mesh(devices=jax.devices()[:1]))
    want, whole, experts = 0, 0, 0
    for path, x in _flat(one.abstract_params).items():
        n = np.dtype(x.dtype).itemsize * math.prod(x.shape)
        whole += n
        experts += n if "['expert']" in path else 0
        want += n if x.ndim < 2 else n // (8 if "['expert']" in path else 4)
    assert experts > 0
    assert r["param_bytes"] == whole
    assert r["per_device"]["params"] == want
    assert r["per_device"]["params"] <= whole / 4
    # The gathers of ZeRO-3: weights all-gathered for use, gradients reduce-scattered (or
    # all-reduced, which the CPU backend may choose for small ones) back to their shards.
    c = r["collectives"]
    assert c["all-gather"]["count"] > 0
    assert c["reduce-scatter"]["count"] + c["all-reduce"]["count"] > 0


# --------------------------------------------------------------------------------------------
# Training through the loop, with a resume on another mesh.
# --------------------------------------------------------------------------------------------


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def test_train_fsdp_and_resume_without_it(tmp_path):
    """Three steps on (fsdp=4, expert=2), checkpointed at 2 and 3. A copy of the run without
    its step-3 checkpoint resumes on (data=4, expert=2): Orbax reshards the fsdp-split state
    to the new mesh, and step 3 has the loss it had on the FSDP mesh."""
    common = ["--config.checkpoint.every=2", "--config.mesh.expert=2", "--config.total_steps=3"]
    run = tmp_path / "fsdp"
    out = train_and_evaluate(_config("decoder", *common, "--config.mesh.fsdp=4"), str(run))
    assert out["step"] == 3 and os.path.isdir(run / "checkpoints" / "2")
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "3")
    out = train_and_evaluate(_config("decoder", *common), str(copy))
    assert out["step"] == 3
    want, got = _losses(run), _losses(copy)
    assert sorted(want) == sorted(got) == [1, 2, 3]
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
