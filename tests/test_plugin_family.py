"""A model family defined here, registered, and taken through upcycle -> verify -> train with
no change to any module of the package: the registry (``models/__init__.py``) is the only
place a family is named.

The family is a small token-mixing-free "MLP language model": token embedding, N pre-norm
gated-MLP blocks with residuals (every other one an MoE layer), a final norm and untied
logits. Its dense checkpoint is a flat ``.npz`` of ``/`` paths (the npz reader's format).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import cli, flop_terms, models
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.layers import Dense, Embed, RMSNorm, activation
from sparse_upcycle.models.moe_config import MoeConfig, average_metrics

NAME = "mlp_lm"


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 48
    emb_dim: int = 16
    mlp_dim: int = 32
    num_layers: int = 2
    moe: MoeConfig = MoeConfig(router="top_k", k=2, capacity_factor=None, layers="every_other")


def config(name: str, **overrides: Any) -> Config:
    if name != "tiny":
        raise ValueError(f"unknown {NAME} size {name!r}")
    return Config(**overrides)


class _Mlp(nnx.Module):
    def __init__(self, d: int, f: int, *, rngs: nnx.Rngs):
        self.wi_0 = Dense(d, f, ("embed", "mlp"), rngs=rngs)
        self.wi_1 = Dense(d, f, ("embed", "mlp"), rngs=rngs)
        self.wo = Dense(f, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.wo(activation("silu")(self.wi_0(x)) * self.wi_1(x))


class Model(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.emb_dim, rngs=rngs)
        sparse = set(cfg.moe.sparse_layers(cfg.num_layers))
        for i in range(cfg.num_layers):
            setattr(self, f"norm_{i}", RMSNorm(cfg.emb_dim, rngs=rngs))
            mlp = (
                cfg.moe.make_layer(
                    cfg.emb_dim, cfg.mlp_dim, ("silu", "linear"), causal=True, rngs=rngs
                )
                if i in sparse
                else _Mlp(cfg.emb_dim, cfg.mlp_dim, rngs=rngs)
            )
            setattr(self, f"block_{i}", mlp)
        self.final_norm = RMSNorm(cfg.emb_dim, rngs=rngs)
        self.logits = Dense(cfg.emb_dim, cfg.vocab_size, ("embed", "vocab"), rngs=rngs)

    def __call__(self, tokens, token_mask=None, *, train=False, rng=None):
        cfg = self.cfg
        sparse = set(cfg.moe.sparse_layers(cfg.num_layers))
        x = self.embed(tokens)
        mask = jnp.ones(tokens.shape, bool) if token_mask is None else token_mask
        metrics = []
        for i in range(cfg.num_layers):
            h = getattr(self, f"norm_{i}")(x)
            if i in sparse:
                key = None if rng is None or not train else jax.random.fold_in(rng, i)
                h, m = getattr(self, f"block_{i}")(h, mask, rng=key, train=train)
                metrics.append(m)
            else:
                h = getattr(self, f"block_{i}")(h)
            x = x + h
        return self.logits(self.final_norm(x)).astype(jnp.float32), average_metrics(metrics)


def abstract_params(cfg: Config) -> dict:
    model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


MOE_FIELDS = ("moe",)
MLP_WIDTH_FIELD = "mlp_dim"
TASK = "lm"
TOKENS_KEY = "tokens"
HF_MAP = None
HF_MODEL_TYPES = ()


def moe_layer_names(cfg: Config) -> list[str]:
    return [f"block_{i}" for i in cfg.moe.sparse_layers(cfg.num_layers)]


def forward(model, batch, train, rng):
    weights = batch["weights"]
    logits, aux = model(batch["tokens"], weights > 0, train=train, rng=rng)
    return logits, batch["targets"], weights, aux


def example_inputs(cfg: Config, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 8))),)


def batch_lengths(batch) -> tuple[int, int, int]:
    b, l = flop_terms.pick(batch, ("tokens",), NAME)[:2] if isinstance(batch, Mapping) else batch
    return b, l, l


def forward_flops(cfg: Config, b: int, s: int, l: int, train: bool) -> dict[str, int]:
    out = flop_terms.zeros()
    n = b * l
    flop_terms.mlp_stack(out, cfg.moe, cfg.num_layers, cfg.emb_dim, cfg.mlp_dim, 2, n, train)
    out["logits"] = 2 * cfg.emb_dim * cfg.vocab_size * n
    return out


@pytest.fixture
def registered():
    models.register(NAME, sys.modules[__name__])  # this module is the family's face
    yield
    models.unregister(NAME)


CONFIG = textwrap.dedent(
    f"""
    import ml_collections

    from sparse_upcycle.train import default_config


    def get_config(arg=None):
        c = default_config()
        c.model = ml_collections.ConfigDict(
            {{
                "family": "{NAME}",
                "name": "tiny",
                "overrides": {{}},
                "moe": {{"router": "top_k", "k": 2, "capacity_factor": None,
                         "eval_capacity_factor": None, "renormalize": True}},
            }}
        )
        c.upcycle = ml_collections.ConfigDict({{"method": "copy", "num_experts": 4}})
        c.data = ml_collections.ConfigDict(
            {{"name": "synthetic", "batch_size": 8, "seq_len": 8, "seed": 0}}
        )
        c.total_steps = 3
        c.log_every = 1
        c.eval_every = 0
        c.eval_steps = 1
        c.peak_flops = 1e10
        c.checkpoint = ml_collections.ConfigDict({{"every": 3, "keep": 1, "async": False}})
        return c
    """
)


def test_a_family_defined_in_a_test_upcycles_verifies_and_trains(registered, tmp_path, capsys):
    cfg_path = tmp_path / "plugin.py"
    cfg_path.write_text(CONFIG)
    dense = Model(config("tiny"), rngs=nnx.Rngs(0))
    flat = flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(dense, nnx.Param))))
    src = str(tmp_path / "dense.npz")
    np.savez(src, **flat)
    dst = str(tmp_path / "moe")

    assert cli.main(["upcycle", "--config", str(cfg_path), "--src", src, "--dst", dst]) == 0
    info = json.load(open(os.path.join(dst, "recipe.json")))
    assert info["family"] == NAME and info["preserves_dense_function"] is True
    capsys.readouterr()

    assert cli.main(["verify", "--config", str(cfg_path), "--dense", src, "--moe", dst]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["meant_to_preserve"] and verdict["ok"]
    assert verdict["max_abs_delta"] < 1e-5
    # The expert weights really are the dense block's, stacked: 4 copies of block_1's MLP.
    from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint

    moe_ckpt = OrbaxCheckpoint(os.path.join(dst, "checkpoint"))
    experts = moe_ckpt.read("block_1/expert/wi_0/kernel")
    assert experts.shape == (4, 16, 32)
    np.testing.assert_array_equal(
        experts, np.broadcast_to(flat["block_1/wi_0/kernel"], (4, 16, 32))
    )

    workdir = str(tmp_path / "run")
    code = cli.main(
        ["train", "--config", str(cfg_path), "--workdir", workdir, f"--config.init_from={dst}"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 3 and result["status"] == "done"
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert train_rows[0]["model_flops_per_step"] > 0 and "tokens_per_second" in train_rows[0]


def test_the_registry_refuses_an_incomplete_family():
    class Partial:
        Config = Config

    with pytest.raises(TypeError, match="lacks"):
        models.register("partial", Partial)
    assert "partial" not in models.names()
