"""Low-precision train state: ``model.param_dtype`` and ``optimizer.state_dtype`` (float32 |
bfloat16, ``sparse_upcycle/optim_dtype.py``).

References are computed another way: the AdamW update from its formula in numpy (float64,
with the stored moments rounded to bfloat16 through ml_dtypes), bfloat16 slots against a
float32-state run, checkpoint tensors against the values they were cast from, and the float32
default against plain ``optax.adamw``. The training runs use tests/configs/train_tiny.py
(``decoder-dense``, 4 steps) and share one module fixture."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sparse_upcycle import cli, optim, plan, sharding, surgeon
from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.config import load_config
from sparse_upcycle.init_from import initial_params, open_init_source
from sparse_upcycle.models import decoder
from sparse_upcycle.train import train_and_evaluate
from sparse_upcycle.training import build_training

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "configs", "train_tiny.py")
UPCYCLE = os.path.join(HERE, os.pardir, "configs", "upcycle_tiny.py")
BF16 = np.dtype(ml_dtypes.bfloat16)
LOW = ["--config.model.param_dtype=bfloat16", "--config.optimizer.state_dtype=bfloat16"]


def _training(spec: str, *overrides: str, source=None):
    config = load_config(f"{TRAIN}:{spec}", list(overrides))
    return config, build_training(config, source, sharding.mesh_from_config(config.mesh))


def _dtypes(tree) -> set[str]:
    return {np.dtype(x.dtype).name for x in jax.tree.leaves(tree)}


def _float_dtypes(tree) -> set[str]:
    return {d for d in _dtypes(tree) if d.startswith(("float", "bfloat"))}


def _pairs(a, b):
    """The leaves of two trees of the same structure, side by side."""
    return zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)


def _slot_names(state) -> set[str]:
    """Names of the floating-point leaves of an optax state (``mu``, ``v_row``, ...)."""
    names = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jnp.issubdtype(leaf.dtype, jnp.floating):  # the innermost optax state field
            names.add([k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)][-1])
    return names


# --------------------------------------------------------------------------- (a) parameters


@pytest.mark.parametrize("spec", ["t5", "vit", "decoder"])
def test_bf16_params_halve_the_planned_parameter_bytes(spec):
    _, f32 = _training(spec)
    _, bf16 = _training(spec, "--config.model.param_dtype=bfloat16")
    assert _dtypes(f32.abstract_params) == {"float32"}
    assert _dtypes(bf16.abstract_params) == {"bfloat16"}
    # what `plan` sums for param_bytes and per_device.params (plan._leaves)
    global_f32 = sum(p[2] for p in plan._leaves(f32.abstract_params, f32.param_sh))
    global_bf16 = sum(p[2] for p in plan._leaves(bf16.abstract_params, bf16.param_sh))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(f32.abstract_params))
    assert global_f32 == 4 * n and global_bf16 == 2 * n
    # the optimizer state stays float32 (state_dtype's default), with the same bytes
    assert _float_dtypes(bf16.abstract_opt) == {"float32"}
    opt = [plan._leaves(t.abstract_opt, t.state_sh["opt_state"]) for t in (f32, bf16)]
    assert sum(o[2] for o in opt[0]) == sum(o[2] for o in opt[1])


def test_random_init_is_the_float32_init_rounded():
    _, f32 = _training("vit-dense")
    config, bf16 = _training("vit-dense", *LOW)
    want, got = f32.init_state(0), bf16.init_state(0)
    assert _dtypes(got["params"]) == {"bfloat16"}
    assert _float_dtypes(got["opt_state"]) == {"bfloat16"}
    for w, g in _pairs(want["params"], got["params"]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w).astype(BF16))
    # the loop's own path (init_from=scratch) gives the same bf16 params
    scratch, _ = initial_params(config, bf16.spec, None, bf16.abstract_params, bf16.param_sh)
    for g, s in _pairs(got["params"], scratch):
        assert s.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(s), np.asarray(g))


# --------------------------------------------------------------------------- (b) optimizer state

# A small tree: a matrix, a norm scale (no weight decay) and stacked experts (per-expert
# Adafactor); min_dim_size_to_factor=4 makes the matrices factored.
SHAPES = {
    "dense": {"kernel": (8, 4)},
    "norm": {"scale": (4,)},
    "ffn": {"expert": {"kernel": (2, 8, 4)}},
}


def _tree(seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s).astype(np.float32), dtype),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _opt(name: str, state_dtype: str, **fields):
    cfg = optim.default_optimizer_config(name)
    cfg.update({"schedule": "constant", "warmup_steps": 0, "state_dtype": state_dtype, **fields})
    tx, _ = optim.make_optimizer(cfg)
    return cfg, tx


def _steps(tx, params, grads: list):
    """The updates of ``len(grads)`` steps from ``tx.init(params)`` and the states after each."""
    state, out = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update(g, state, params)
        out.append((u, state))
    return out


def _adamw_reference(cfg, params, grads: list, state_dtype) -> list:
    """optax.adamw's steps from the formula (Loshchilov & Hutter 2019, Algorithm 2, with
    optax's placement of eps: ``m_hat / (sqrt(v_hat) + eps)``), in float32 numpy with the
    stored moments rounded to ``state_dtype`` after every step: ``[(updates, m, v)]``, flat.
    float32, not float64: a bf16 gradient squared has 16 significant bits, and times
    ``1 - b2`` it often lands within a float32 unit of a bf16 rounding midpoint, so only the
    same float32 products round ``v`` the same way."""
    f32 = np.float32
    b1, b2, eps, lr, wd = (
        f32(x) for x in (cfg.b1, cfg.b2, cfg.eps, cfg.learning_rate, cfg.weight_decay)
    )
    p = {k: np.asarray(x, f32) for k, x in flatten(params).items()}
    m = {k: np.zeros_like(x) for k, x in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t, g in enumerate(grads, start=1):
        g = {k: np.asarray(x, f32) for k, x in flatten(g).items()}
        u = {}
        c1, c2 = f32(1) - b1 ** f32(t), f32(1) - b2 ** f32(t)  # bias corrections
        for k in p:
            m1 = f32(1 - cfg.b1) * g[k] + b1 * m[k]
            v1 = f32(1 - cfg.b2) * (g[k] * g[k]) + b2 * v[k]
            step = (m1 / c1) / (np.sqrt(v1 / c2) + eps)
            decays = p[k].ndim > 1 and not k.endswith("scale")
            u[k] = -lr * (step + wd * p[k]) if decays else -lr * step
            m[k] = m1.astype(state_dtype).astype(f32)
            v[k] = v1.astype(state_dtype).astype(f32)
        out.append((u, dict(m), dict(v)))
    return out


def _adam_moments(state):
    """(mu, nu) of the ``optax.scale_by_adam`` state inside ``state``."""
    (node,) = [
        n for n in jax.tree.leaves(state, is_leaf=lambda n: hasattr(n, "nu")) if hasattr(n, "nu")
    ]
    return flatten(node.mu), flatten(node.nu)


def test_adamw_bf16_moments_follow_the_formula_on_bf16_params():
    params = _tree(0, jnp.bfloat16)  # as under model.param_dtype=bfloat16: bf16 params, grads
    grads = [_tree(s, jnp.bfloat16) for s in (1, 2, 3)]
    cfg, tx = _opt("adamw", "bfloat16", learning_rate=0.01)
    got = _steps(tx, params, grads)
    want = _adamw_reference(cfg, params, grads, BF16)
    for (u, state), (ref_u, ref_m, ref_v) in zip(got, want, strict=True):
        assert _slot_names(state) == {"mu", "nu"} and _float_dtypes(state) == {"bfloat16"}
        assert _dtypes(u) == {"float32"}  # computed and returned in float32
        mu, nu = _adam_moments(state)
        for k, x in flatten(u).items():
            # the stored moments: the same bf16 numbers; the updates: float32 rounding apart
            np.testing.assert_array_equal(np.asarray(mu[k], np.float32), ref_m[k], err_msg=k)
            np.testing.assert_array_equal(np.asarray(nu[k], np.float32), ref_v[k], err_msg=k)
            np.testing.assert_allclose(np.asarray(x), ref_u[k], rtol=1e-5, atol=1e-9, err_msg=k)
    # and the float32-state run: the same first update (the rounding is of the stored state),
    # then close to bf16 precision (8 significant bits: 2^-9 relative per rounding)
    f32 = _steps(_opt("adamw", "float32", learning_rate=0.01)[1], params, grads)
    for step, ((u16, _), (u32, _)) in enumerate(zip(got, f32, strict=True)):
        for a, b in _pairs(u16, u32):
            if step == 0:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=1e-4)


def test_adafactor_bf16_factors_and_momentum():
    params, grads = _tree(0), [_tree(s) for s in (1, 2, 3)]
    fields = dict(min_dim_size_to_factor=4, momentum=0.9, learning_rate=0.01)
    low = _steps(_opt("adafactor", "bfloat16", **fields)[1], params, grads)
    ref = _steps(_opt("adafactor", "float32", **fields)[1], params, grads)
    state16, state32 = low[0][1], ref[0][1]
    assert {"v_row", "v_col", "v", "ema"} <= _slot_names(state16)
    assert _float_dtypes(state16) == {"bfloat16"} and _float_dtypes(state32) == {"float32"}
    # the expert kernel [2, 8, 4] is factored per expert: v_row [2, 8], v_col [2, 4]
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state16)}
    assert {(2, 8), (2, 4), (8,), (4,)} <= shapes
    # step 1 from the same inputs: the bf16 state is the float32 state rounded
    for a, b in _pairs(state16, state32):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(a.dtype))
    for (u16, _), (u32, _) in zip(low, ref, strict=True):
        assert _dtypes(u16) == {"float32"}
        for a, b in _pairs(u16, u32):
            scale = float(np.max(np.abs(b)))  # bf16 slots: ~2^-9 relative per rounding
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=1e-2 * scale)


# --------------------------------------------------------------------------- (c) bad values


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.param_dtype=float16",
            "model.param_dtype must be one of float32, bfloat16; got 'float16'",
        ),
        (
            "optimizer.state_dtype=int8",
            "config.optimizer.state_dtype must be one of float32, bfloat16; got 'int8'",
        ),
        (
            "optimizer.state_dtyp=bfloat16",
            "unknown field config.optimizer.state_dtyp; did you mean config.optimizer.state_dtype?",
        ),
    ],
)
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, override, message):
    workdir = tmp_path / "w"
    argv = ["train", "--config", f"{TRAIN}:vit", "--workdir", str(workdir), f"--config.{override}"]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == f"sparse-upcycle: error: {message}"
    assert not workdir.exists()


# --------------------------------------------------------------------------- (d) resume, export


@pytest.fixture(scope="module")
def dense_npz(tmp_path_factory):
    """A random dense tiny decoder (float32) as .npz, and its flat params."""
    model = decoder.Decoder(decoder.config("tiny"), rngs=nnx.Rngs(0))
    flat = flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    path = tmp_path_factory.mktemp("dense") / "dense.npz"
    np.savez(path, **flat)
    return str(path), flat


RUN = ["--config.optimizer.name=adamw", "--config.total_steps=4", "--config.checkpoint.every=2"]


def _run_config(npz: str):
    return load_config(f"{TRAIN}:decoder-dense", [*LOW, *RUN, f"--config.init_from={npz}"])


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


@pytest.fixture(scope="module")
def low_run(dense_npz, tmp_path_factory):
    """4 steps from the dense checkpoint with bf16 params and AdamW state; checkpoints 2, 4."""
    workdir = tmp_path_factory.mktemp("runs") / "straight"
    assert train_and_evaluate(_run_config(dense_npz[0]), str(workdir))["step"] == 4
    return workdir


def test_checkpoint_params_are_cast_on_load(dense_npz):
    npz, flat = dense_npz
    config, t = _training("decoder-dense", *LOW, f"--config.init_from={npz}")
    params, _ = initial_params(
        config, t.spec, open_init_source(config), t.abstract_params, t.param_sh
    )
    got = flatten(params)
    assert sorted(got) == sorted(flat)
    for k, v in got.items():
        assert v.dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(np.asarray(v), flat[k].astype(BF16), err_msg=k)


def test_resumed_bf16_run_has_the_uninterrupted_losses(low_run, dense_npz):
    ckpt = OrbaxCheckpoint(str(low_run / "checkpoints" / "4" / "state"))
    assert {np.dtype(ckpt.dtype(k)).name for k in ckpt.keys()} == {"bfloat16"}
    copy = low_run.parent / "resumed"
    shutil.copytree(low_run, copy)
    shutil.rmtree(copy / "checkpoints" / "4")
    out = train_and_evaluate(_run_config(dense_npz[0]), str(copy))
    assert out["step"] == 4 and out["timing"]["steps_timed"] == 1  # it ran steps 3-4 only
    want = _losses(low_run)
    assert sorted(want) == [1, 2, 3, 4]
    assert _losses(copy) == want  # bit-identical: the bf16 state is restored as it was saved


def test_export_writes_the_source_dtype(low_run, capsys):
    """A step of a bf16 run exports as the source's dtype: float32 (the config names no HF
    dtype); every tensor is the checkpoint's bf16 value, exactly, in float32."""
    step = str(low_run / "checkpoints" / "4")
    out = low_run.parent / "hf"
    argv = ["export", "--src", step, "--dst", str(out), "--config", f"{TRAIN}:decoder-dense"]
    assert cli.main([*argv, *LOW]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    tensors = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    ours = OrbaxCheckpoint(step).read("token_embedder/embedding")
    assert ours.dtype == BF16
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], ours.astype(np.float32))


def test_upcycle_ignores_param_dtype(dense_npz, tmp_path):
    outs = []
    for extra in ([], ["--config.model.param_dtype=bfloat16"]):
        dst = tmp_path / f"moe{len(extra)}"
        argv = ["upcycle", "--config", f"{UPCYCLE}:decoder", "--src", dense_npz[0]]
        assert cli.main([*argv, "--dst", str(dst), *extra]) == 0
        outs.append(surgeon.load_upcycled(str(dst))[1])
    assert sorted(outs[0]) == sorted(outs[1])
    for k, v in outs[0].items():
        assert v.dtype == np.float32, k
        np.testing.assert_array_equal(outs[1][k], v, err_msg=k)


# --------------------------------------------------------------------------- (e) the default


def test_float32_default_is_plain_optax():
    _, t = _training("decoder", "--config.optimizer.name=adamw")
    assert _dtypes(t.abstract_params) == {"float32"}
    assert _float_dtypes(t.abstract_opt) == {"float32"}
    cfg, tx = _opt("adamw", "float32", learning_rate=0.01)
    assert cfg.state_dtype == optim.default_optimizer_config("adamw").state_dtype == "float32"
    plain = optax.adamw(
        optax.constant_schedule(0.01),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=optim.decay_mask,
    )
    params, grads = _tree(0), [_tree(s) for s in (1, 2)]
    for (u, s), (w, r) in zip(_steps(tx, params, grads), _steps(plain, params, grads), strict=True):
        for a, b in _pairs((u, s), (w, r)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
