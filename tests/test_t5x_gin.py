"""T5X gin files (``--gin_file``, ``--gin.NAME=value``): the bindings of files written here in the
T5X form (``from __gin__ import dynamic_registration``, imports of modules that are not
installed, ``include``, blocks, scoped names, ``%MACRO`` references, ``@configurable()``),
mapped to our config, and ``upcycle`` / ``train`` run from them. The expected values are the
ones written in the files, not our code's."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import cli
from sparse_upcycle.checkpoints.t5x import write_t5x
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.config import ConfigError
from sparse_upcycle.models import t5
from sparse_upcycle.t5x_gin import load
from sparse_upcycle.t5x_gin.mapping import sparse_layers

GIN = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "gin")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The shipped gin files (configs/gin, T5X's form) and a dense tiny T5X checkpoint."""
    root = tmp_path_factory.mktemp("gin")
    model = t5.T5(t5.config("tiny"), rngs=nnx.Rngs(0))
    params = flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    ckpt = str(root / "dense" / "checkpoint_300")
    write_t5x(ckpt, params, step=300)
    return GIN, ckpt


class _Args:
    def __init__(self, files, bindings=(), config=None):
        self.gin_file = [str(f) for f in files]
        self.gin_bindings = list(bindings)
        self.gin_search_paths = ""
        self.config = config


def _files(root, *names):
    paths = {
        "tiny": "t5_1_1_tiny.gin",
        "pretrain": "pretrain_tiny.gin",
        "moe": "experts_choose_tiny.gin",
        "upcycle": "sparse_upcycle_tiny.gin",
    }
    return [os.path.join(root, paths[n]) for n in names]


def test_dense_t5x_files_give_the_values_written_in_them(tree):
    root, _ = tree
    args = _Args(
        _files(root, "tiny", "pretrain"), ["--gin.DROPOUT_RATE=0.0", "--gin.TRAIN_STEPS=1200"]
    )
    config, mapped = load(args, ["--config.eval_every=7"], "train")
    o = config.model.overrides
    assert (config.model.family, o.vocab_size, o.emb_dim, o.num_heads, o.head_dim) == (
        "t5", 128, 32, 4, 8,
    )  # fmt: skip
    assert (o.mlp_dim, o.num_encoder_layers, o.num_decoder_layers) == (64, 2, 2)
    assert tuple(o.mlp_activations) == ("gelu", "linear") and o.dtype == "float32"
    assert o.dropout_rate == 0.0 and o.logits_via_embedding is False
    assert config.model.encoder_moe.num_experts == 0 and config.model.decoder_moe.num_experts == 0
    assert (config.data.batch_size, config.data.seq_len, config.data.target_len) == (16, 32, 8)
    assert config.loss.z_loss == 0.0001 and config.loss.label_smoothing == 0.0
    opt = config.optimizer
    assert (opt.name, opt.schedule, opt.learning_rate, opt.warmup_steps) == (
        "adafactor", "rsqrt", 1.0, 10000,
    )  # fmt: skip
    assert opt.decay_rate == 0.8 and opt.step_offset == 0
    assert (config.total_steps, config.eval_steps, config.checkpoint.every) == (1200, 2, 500)
    assert config.eval_every == 7  # --config.* overrides come last
    assert any("c4_v220_span_corruption" in n for n in mapped.notes)
    assert any("keep = None" in n for n in mapped.notes)


def test_the_last_binding_wins_and_macros_are_late_bound(tree, tmp_path):
    root, _ = tree
    late = tmp_path / "late.gin"
    late.write_text("BATCH_SIZE = 8\nnetwork.T5Config.mlp_dim = 96\n")
    args = _Args(
        [*_files(root, "tiny", "pretrain"), late],
        ["--gin.DROPOUT_RATE=0.1", "--gin.TRAIN_STEPS=10", "--gin.network.T5Config.emb_dim=48"],
    )
    config, mapped = load(args, [], "train")
    assert config.data.batch_size == 8  # the macro's last value, where pretrain.gin used it
    assert config.model.overrides.mlp_dim == 96 and config.model.overrides.emb_dim == 48
    assert config.model.overrides.dropout_rate == 0.1
    assert any("attention" in n for n in mapped.notes)  # dropout > 0: what differs from T5X


def test_flaxformer_moe_and_t5x_sparse_upcycle_run(tree):
    root, ckpt = tree
    args = _Args(
        _files(root, "moe", "upcycle"),
        [f"--gin.INITIAL_CHECKPOINT_PATH='{ckpt}'", "--gin.TRAIN_STEPS=310"],
    )
    config, mapped = load(args, [], "train")
    o, enc, dec = config.model.overrides, config.model.encoder_moe, config.model.decoder_moe
    assert (o.vocab_size, o.emb_dim, o.num_heads, o.head_dim, o.mlp_dim) == (128, 32, 4, 8, 64)
    assert (o.num_encoder_layers, o.num_decoder_layers, o.dtype) == (2, 2, "float32")
    # MIXED with 1 sparse of 2 layers: flaxformer makes layer 1 sparse (i % 2 == 1)
    assert enc.layers == "every_other" and dec.layers == "every_other"
    assert (enc.router, enc.num_experts, enc.capacity_factor, enc.eval_capacity_factor) == (
        "expert_choice", 4, 2.0, 2.0,
    )  # fmt: skip
    assert enc.normalize_combine_weights is False
    # tokens choose top-2 at T5X's C = 2: round(2·S/E) slots = ours ceil(1.0·S·2/E)
    assert (dec.router, dec.k, dec.capacity_factor, dec.eval_capacity_factor) == (
        "top_k", 2, 1.0, 1.0,
    )  # fmt: skip
    assert dec.ordering == "softmax_then_topk" and dec.renormalize is False
    assert dec.batch_prioritized is False
    assert (enc.group_size, enc.group_multiple, enc.router_init_std) == (64, 4, 0.02)
    assert (enc.aux_loss_weight, enc.router_z_loss_weight) == (0.01, 0.0)
    assert config.loss.z_loss == 0.0001
    assert config.init_from == ckpt
    # T5X counts steps from the checkpoint's 300: 10 more steps, the rsqrt schedule continued
    assert config.total_steps == 10 and config.optimizer.step_offset == 300
    assert config.mesh.expert == 1
    up = config.upcycle
    assert (up.method, up.num_experts, up.optimizer, up.step) == ("copy", 4, "reset", "reset")


def test_sparse_layouts_follow_flaxformer():
    def reference(layer, n, s, layout):  # flaxformer moe_architecture._is_sparse_layer
        if layout == "bottom":
            return layer < s
        if layout == "middle":
            return n - s <= 2 * layer < n + s
        if layout == "mixed":
            return s > 0 and layer % (n // s) == n // s - 1
        return layer >= n - s

    for n in (2, 6, 12, 24):
        for s in range(n + 1):
            for layout in ("bottom", "middle", "mixed", "top"):
                if layout == "mixed" and s and n % s:
                    continue
                want = tuple(i for i in range(n) if reference(i, n, s, layout))
                assert sparse_layers(n, s, layout, "x") == want, (n, s, layout)
    assert sparse_layers(24, 12, "mixed", "x") == tuple(range(1, 24, 2))  # the paper's "half"
    with pytest.raises(ConfigError, match="divide"):
        sparse_layers(12, 5, "mixed", "x")


def test_upcycle_and_train_from_gin_files(tree, tmp_path, capsys):
    root, ckpt = tree
    gin = [f"--gin_file={f}" for f in _files(root, "moe", "upcycle")]
    binds = [f"--gin.INITIAL_CHECKPOINT_PATH='{ckpt}'", "--gin.TRAIN_STEPS=302"]
    dst = str(tmp_path / "moe")
    code = cli.main(["upcycle", *gin, *binds, "--dst", dst])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "gin: 2 file(s)" in out.err
    info = json.load(open(os.path.join(dst, "recipe.json")))
    assert info["source"]["format"] == "t5x" and info["source"]["step"] == 300
    assert (
        info["recipe"]["num_experts"] == 4
        and info["model"]["encoder_moe"]["layers"] == "every_other"
    )
    assert info["model"]["encoder_moe"]["router"] == "expert_choice"
    work = str(tmp_path / "run")
    code = cli.main(["train", *gin, *binds, "--workdir", work, "--config.eval_every=0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    json.loads(out.out)
    # T5X's TRAIN_STEPS 302 from the checkpoint's step 300: two steps here
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]


@pytest.mark.parametrize(
    "binding, named",
    [
        ("--gin.network.T5Config.foo=1", "network.T5Config.foo"),
        ("--gin.utils.create_learning_rate_scheduler.factors='constant * linear_warmup * "
         "rsqrt_decay'", "create_learning_rate_scheduler.factors"),
        ("--gin.trainer.Trainer.num_microbatches=4", "trainer.Trainer.num_microbatches"),
        ("--gin.adafactor.Adafactor.epsilon2=1e-4", "adafactor.Adafactor.epsilon2"),
        ("--gin.models.EncoderDecoderModel.loss_normalizing_factor=233472", "loss_normalizing"),
        ("--gin.network.T5Config.float32_attention_logits=True", "float32_attention_logits"),
    ],
)  # fmt: skip
def test_bindings_we_cannot_honour_are_refused_by_name(tree, tmp_path, capsys, binding, named):
    root, _ = tree
    gin = [f"--gin_file={f}" for f in _files(root, "tiny", "pretrain")]
    argv = ["train", *gin, "--gin.DROPOUT_RATE=0.0", "--gin.TRAIN_STEPS=5", binding]
    code = cli.main([*argv, "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-upcycle: error:")
    assert named in lines[0]
    assert not os.path.exists(tmp_path / "w")


def test_unbound_required_missing_include_and_bad_syntax(tree, tmp_path, capsys):
    root, _ = tree
    cases = [
        (_files(root, "tiny", "pretrain"), ["--gin.TRAIN_STEPS=5"], "DROPOUT_RATE"),
        ([tmp_path / "inc.gin"], [], "include 'nowhere/x.gin' not found"),
        ([tmp_path / "bad.gin"], [], "bad.gin:2"),
        ([tmp_path / "none.gin"], [], "not found"),
    ]
    (tmp_path / "inc.gin").write_text("include 'nowhere/x.gin'\n")
    (tmp_path / "bad.gin").write_text("A = 1\nnetwork.T5Config.emb_dim = = 3\n")
    for files, binds, named in cases:
        argv = ["plan", *[f"--gin_file={f}" for f in files], *binds, "--devices", "1"]
        code = cli.main([*argv, "--hbm", "16GiB"])
        err = capsys.readouterr().err
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err


def test_includes_by_repository_path_and_search_paths(tmp_path, monkeypatch):
    """``include 't5x/...'`` resolves from the including file's parents (a checkout's root) or
    from --gin_search_paths, whatever the working directory."""
    checkout = tmp_path / "checkout"
    arch = checkout / "t5x" / "examples" / "t5" / "t5_1_1"
    arch.mkdir(parents=True)
    (arch / "base.gin").write_text(
        "network.T5Config:\n  vocab_size = 64\n  emb_dim = 16\n  dropout_rate = 0.0\n"
    )
    (arch / "small.gin").write_text(
        "include 't5x/examples/t5/t5_1_1/base.gin'\nnetwork.T5Config.emb_dim = 24\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "run.gin").write_text("include 't5x/examples/t5/t5_1_1/small.gin'\n")
    monkeypatch.chdir(elsewhere)
    config, _ = load(_Args([arch / "small.gin"]), [], "plan")
    assert (config.model.overrides.vocab_size, config.model.overrides.emb_dim) == (64, 24)
    with pytest.raises(ConfigError, match="not found"):
        load(_Args([elsewhere / "run.gin"]), [], "plan")
    args = _Args([elsewhere / "run.gin"])
    args.gin_search_paths = str(checkout)
    config, _ = load(args, [], "plan")
    assert config.model.overrides.emb_dim == 24
    # T5X's dataclass defaults for what the files leave unbound
    assert tuple(config.model.overrides.mlp_activations) == ("relu",)
    assert config.model.overrides.num_encoder_layers == 6


@pytest.mark.parametrize(
    "binding, named",
    [
        ("--gin.moe_layers.MoeLayer.min_expert_capacity=8", "min_expert_capacity"),
        ("--gin.routing.TokensChooseMaskedRouter.ignore_padding_tokens=True",
         "ignore_padding_tokens"),
        ("--gin.moe_layers.MoeLayer.foo=1", "moe_layers.MoeLayer.foo"),
        ("--gin.dense.MlpBlock.use_bias=True", "dense.MlpBlock.use_bias"),
        ("--gin.sparse_decoder/moe_layers.MoeLayer.router=@routing.SomeRouter()", "SomeRouter"),
        ("--gin.ENCODER_SPARSE_LAYOUT='diagonal'", "diagonal"),
    ],
)  # fmt: skip
def test_moe_bindings_we_cannot_honour_are_refused_by_name(tree, binding, named):
    root, ckpt = tree
    args = _Args(_files(root, "moe", "upcycle"), [f"--gin.INITIAL_CHECKPOINT_PATH='{ckpt}'",
                                                  "--gin.TRAIN_STEPS=310", binding])  # fmt: skip
    with pytest.raises(ConfigError, match=named):
        load(args, [], "upcycle")
