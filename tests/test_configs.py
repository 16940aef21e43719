"""The experiment configs (``configs/``) and the launch scripts (``scripts/launch_*.sh``).

Every config loads at paper scale and as ``:tiny``, resolves to a model and a valid recipe, and
carries the paper's settings where those are the paper's claims (Komatsuzaki et al. 2023 §3.1:
32 experts in half of the MLP layers, expert choice C = 2 in encoders, top-2 in the T5
decoder, optimizer state reset for language and kept for vision). Paper-scale models are only
resolved and shaped with ``jax.eval_shape``, never allocated. One end-to-end test runs the tiny
T5 two-step recipe (dense from scratch, then upcycled from the trainer's own checkpoint).
"""

from __future__ import annotations

import glob
import math
import os
import subprocess
import types

import jax
import numpy as np
import pytest

from sparse_upcycle import models, routing, sharding
from sparse_upcycle.config import load_config
from sparse_upcycle.models import decoder
from sparse_upcycle.task import moe_layer_names, recipe_from, resolve_model
from sparse_upcycle.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SCRIPTS = os.path.join(ROOT, "scripts")

KINDS = ("dense_continue", "upcycle", "moe_scratch")
T5 = [f"t5_{size}_{kind}" for size in ("base", "large", "xl") for kind in KINDS]
VIT = [f"vit_{size}_{kind}" for size in ("b16", "l16") for kind in KINDS]
LLAMA = ["llama_moe_8x_top2"]
QWEN = ["qwen_moe_fine_grained"]
EXPERIMENTS = T5 + VIT + LLAMA + QWEN
# Stand-ins for the HF checkpoint that ``model.name = "checkpoint"`` takes its architecture from.
LLAMA2_7B = types.SimpleNamespace(config=decoder.config("llama2-7b"))
QWEN25_05B = types.SimpleNamespace(config=decoder.config("qwen2.5-0.5b"))


def path(name: str) -> str:
    return os.path.join(CONFIGS, f"{name}.py")


def resolve(name: str, config):
    hf = config.model.family == "decoder" and config.model.name == "checkpoint"
    stand_in = QWEN25_05B if name in QWEN else LLAMA2_7B
    return resolve_model(config, stand_in if hf else None)


def every_other(n: int) -> tuple[int, ...]:
    return tuple(range(1, n, 2))


def test_every_experiment_has_a_config_file():
    found = {
        os.path.basename(p)[:-3]
        for p in glob.glob(os.path.join(CONFIGS, "*.py"))
        if not os.path.basename(p).startswith("_")
    }
    # upcycle_tiny is the surgeon's; compare_* are tested in test_compare_configs.py.
    compare = {
        "compare_vit_fmnist",
        "compare_t5_text",
        "compare_btx_text",
        "compare_paper_text",
        "compare_paper_vit",
        "compare_vgroup_text",
        "compare_drop_text",
        "compare_finetune_text",
    }
    assert found - {"upcycle_tiny"} - compare == set(EXPERIMENTS)


@pytest.mark.parametrize("arg", ["", ":tiny"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_loads_and_resolves(name, arg):
    config = load_config(path(name) + arg)
    spec = resolve(name, config)
    if "upcycle" in config:
        recipe = recipe_from(config)  # validates the recipe
        method = "fine_grained_shared" if name in QWEN else "copy"
        assert spec.recipe == recipe and recipe.method == method
        assert recipe.preserves_dense_function  # exact copies: no noise
        assert moe_layer_names(spec), "an upcycle config must have MoE layers"
    else:
        assert spec.recipe is None and moe_layer_names(spec) == []
    expected_family = {"t5": T5, "vit": VIT, "decoder": LLAMA + QWEN}
    assert name in expected_family[spec.family]


@pytest.mark.parametrize(
    "name, expected",
    [
        # 12 + 12 blocks, every other one sparse: 12 MoE layers of 32 gated experts [d, f].
        ("t5_base_upcycle", 12 * 32 * 3 * 768 * 2048),
        # 24 + 24 blocks: 24 MoE layers of 32 experts, 24B expert parameters.
        ("t5_xl_upcycle", 24 * 32 * 3 * 2048 * 5120),
        # 24 blocks: 12 MoE layers of 32 two-matrix experts with biases.
        ("vit_l16_upcycle", 12 * 32 * (2 * 1024 * 4096 + 4096 + 1024)),
        # 32 blocks, all sparse: 8 SwiGLU experts each.
        ("llama_moe_8x_top2", 32 * 8 * 3 * 4096 * 11008),
    ],
)
def test_paper_scale_expert_parameters(name, expected):
    """Expert parameter counts from the shapes alone (jax.eval_shape: nothing allocated)."""
    spec = resolve(name, load_config(path(name)))
    family = models.get(spec.family)
    shapes = jax.eval_shape(lambda: family.abstract_params(spec.config))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    expert = sum(
        math.prod(leaf.shape)
        for keys, leaf in flat
        if "expert" in [str(getattr(k, "key", k)) for k in keys]
    )
    assert expert == expected


@pytest.mark.parametrize("name", T5)
def test_t5_paper_settings(name):
    size, kind = name.split("_", 2)[1:]
    c = load_config(path(name))
    spec = resolve(name, c)
    dims = {"base": (768, 2048, 12), "large": (1024, 2816, 24), "xl": (2048, 5120, 24)}[size]
    cfg = spec.config
    assert (cfg.emb_dim, cfg.mlp_dim, cfg.num_encoder_layers) == dims  # T5 v1.1 sizes
    assert c.optimizer.name == "adafactor" and c.optimizer.schedule == "rsqrt"
    if kind == "moe_scratch":
        assert c.init_from == "scratch" and c.optimizer.step_offset == 0
    else:
        # The dense rsqrt schedule continues from the public checkpoints' step 1M.
        assert c.init_from == "" and c.optimizer.step_offset == 1_000_000
    if kind == "dense_continue":
        assert "upcycle" not in c
        return
    enc, dec = cfg.encoder_moe, cfg.decoder_moe
    assert enc.num_experts == dec.num_experts == 32
    assert enc.sparse_layers(dims[2]) == dec.sparse_layers(dims[2]) == every_other(dims[2])
    assert (enc.router, enc.capacity_factor, enc.eval_capacity_factor) == ("expert_choice", 2, 2)
    assert not enc.normalize_combine_weights  # normalising hurt language (paper §3.1)
    assert (dec.router, dec.k, dec.ordering, dec.renormalize) == (
        "top_k",
        2,
        "softmax_then_topk",
        False,
    )
    # T5X/flaxformer's capacity is round(C·S/E) for every router: "C = 2" for top-2 is 2·S/E
    # slots, which this code base (ceil(C·S·K/E)) gets from capacity_factor 1.
    s = dec.group_size
    assert routing.top_k_capacity(s, 32, 2, dec.capacity_factor) == round(2 * s / 32)
    assert routing.expert_choice_capacity(s, 32, enc.capacity_factor) == round(2 * s / 32)
    assert spec.recipe.optimizer == "reset" and spec.recipe.step == "reset"
    assert spec.recipe.num_experts == 32 and spec.recipe.router_init_std == 0.02


@pytest.mark.parametrize("name", VIT)
def test_vit_paper_settings(name):
    size, kind = name.split("_", 2)[1:]
    c = load_config(path(name))
    cfg = resolve(name, c).config
    assert (cfg.width, cfg.depth, cfg.patch_size) == {
        "b16": (768, 12, (16, 16)),
        "l16": (1024, 24, (16, 16)),
    }[size]
    assert cfg.pool_type == "gap" and cfg.image_size == (224, 224)  # paper §2.2: GAP
    assert c.optimizer.schedule == "rsqrt"
    if kind == "dense_continue":
        assert "upcycle" not in c and not cfg.moe.sparse_layers(cfg.depth)
        return
    moe = cfg.moe
    assert moe.num_experts == 32 and moe.sparse_layers(cfg.depth) == every_other(cfg.depth)
    assert (moe.router, moe.capacity_factor, moe.eval_capacity_factor) == ("expert_choice", 2, 2)
    assert moe.normalize_combine_weights  # helped vision (paper §3.1)
    assert moe.group_size % cfg.seq_len == 0  # routing groups hold whole images
    assert c.upcycle.optimizer == "tile"  # vision keeps the dense optimizer state
    assert c.optimizer.name == "adafactor"  # the tiled slots are Adafactor's


def test_llama_settings():
    c = load_config(path("llama_moe_8x_top2"))
    spec = resolve("llama_moe_8x_top2", c)
    moe, layers = spec.config.moe, spec.config.num_hidden_layers
    assert moe.num_experts == 8 and moe.sparse_layers(layers) == tuple(range(layers))
    assert (moe.router, moe.k, moe.ordering, moe.capacity_factor) == (
        "top_k",
        2,
        "topk_then_softmax",
        2.0,  # capacity-based at full scale until dropless is expert-parallel (docstring)
    )
    assert c.optimizer.name == "adamw" and c.optimizer.schedule == "cosine"
    assert c.optimizer.to_dict()["decay_steps"] == c.total_steps
    # decay_steps follows a total_steps override
    shorter = load_config(path("llama_moe_8x_top2"), ["--config.total_steps=5000"])
    assert shorter.optimizer.to_dict()["decay_steps"] == 5000
    dense = load_config(path("llama_moe_8x_top2") + ":tiny_dense")
    assert "upcycle" not in dense and resolve("x", dense).recipe is None
    tiny = resolve("x", load_config(path("llama_moe_8x_top2") + ":tiny")).config
    assert tiny.moe.sparse_layers(tiny.num_hidden_layers) == tuple(range(tiny.num_hidden_layers))
    assert tiny.moe.capacity_factor is None  # the tiny variant stays dropless, as Mixtral


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_variant_runs_on_one_or_eight_devices(name):
    c = load_config(path(name) + ":tiny")
    assert c.data.name == "synthetic" and c.total_steps <= 500
    assert c.model.name == ("qwen2-tiny" if name in QWEN else "tiny")
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = sharding.make_mesh(c.mesh.data, c.mesh.expert, c.mesh.model, devices=devices)
        assert c.data.batch_size % (mesh.shape["data"] * mesh.shape["expert"]) == 0
    assert len(jax.devices()) == 8  # conftest's fake devices: the 8-device case was real


def test_paper_scale_refuses_to_start_without_a_checkpoint():
    from sparse_upcycle.config import ConfigError
    from sparse_upcycle.init_from import open_init_source

    for name in EXPERIMENTS:
        c = load_config(path(name))
        if c.init_from == "scratch":
            continue
        with pytest.raises(ConfigError, match="init_from is not set"):
            open_init_source(c)


# --------------------------------------------------------------------------------------------
# Launch scripts.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["launch_tpu_pod.sh", "launch_slurm.sh"])
def test_script_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(SCRIPTS, script)], check=True)


def _fake_bin(tmp_path, tools: dict[str, str]) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    tool = repo / ".venv" / "bin" / "sparse-upcycle"
    tool.write_text("#!/usr/bin/env bash\nprintf '%s|' \"$@\"; echo\n")  # echoes its args
    tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REPO_DIR": str(repo)}


def test_slurm_script_gives_each_task_its_process_id(tmp_path):
    env = _fake_bin(
        tmp_path,
        {
            "scontrol": "printf 'node-a\\nnode-b\\nnode-c\\n'\n",
            # one run per task, as srun would, with SLURM_PROCID set
            "srun": "while [[ $1 == --* ]]; do shift; done\n"
            'for ((p=0; p<SLURM_NTASKS; p++)); do SLURM_PROCID=$p "$@"; done\n',
        },
    )
    env.update(SLURM_JOB_NODELIST="node-[a-c]", SLURM_NTASKS="3")
    out = subprocess.run(
        ["bash", os.path.join(SCRIPTS, "launch_slurm.sh"), "c.py", "/w d", "--config.seed=1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 3
    for rank, line in enumerate(out):
        args = line.split("|")
        assert args[:5] == ["train", "--config", "c.py", "--workdir", "/w d"]
        assert "--config.distributed.num_processes=3" in args
        assert f"--config.distributed.process_id={rank}" in args
        assert "--config.distributed.coordinator_address=node-a:8476" in args
        assert "--config.seed=1" in args


def test_tpu_script_runs_one_process_per_worker(tmp_path):
    record = tmp_path / "remote.sh"
    env = _fake_bin(
        tmp_path,
        {
            "gcloud": 'if [[ " $* " == *" describe "* ]]; then echo "10.0.0.5;10.0.0.6"; exit; fi\n'
            'while [[ $# -gt 0 ]]; do [[ $1 == --command ]] && printf %s "$2" > "$RECORD"; '
            "shift; done\n",
            "curl": "echo 1\n",  # the worker number from the TPU VM metadata
        },
    )
    env["RECORD"] = str(record)
    subprocess.run(
        ["bash", os.path.join(SCRIPTS, "launch_tpu_pod.sh"), "tpu", "zone", "c.py", "/w d"],
        env=env,
        check=True,
    )
    remote = record.read_text()
    subprocess.run(["bash", "-n", "-c", remote], check=True)
    # What worker 1 would run (curl answers 1):
    args = (
        subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, check=True)
        .stdout.strip()
        .split("|")
    )
    assert args[:5] == ["train", "--config", "c.py", "--workdir", "/w d"]
    assert "--config.distributed.num_processes=2" in args
    assert "--config.distributed.process_id=1" in args
    assert "--config.distributed.coordinator_address=10.0.0.5:8476" in args


# --------------------------------------------------------------------------------------------
# End to end: the tiny T5 two-step recipe.
# --------------------------------------------------------------------------------------------


def _tiny(name: str, **overrides):
    items = [f"--config.{k}={v!r}" for k, v in overrides.items()]
    c = load_config(path(name) + ":tiny", items)
    c.peak_flops = 1e12  # skip the matmul benchmark that only feeds the MFU metric
    c.checkpoint["async"] = False
    return c


def _first_step(name, init_from, workdir, **overrides) -> dict:
    """Train metrics of the first update: the loss of the initial parameters on batch 0."""
    c = _tiny(name, init_from=init_from, total_steps=1, **overrides)
    return train_and_evaluate(c, str(workdir))["train"]


@pytest.mark.slow
def test_tiny_two_step_recipe(tmp_path):
    # 1. The tiny dense model from scratch (the dense_continue config, as its docstring shows).
    dense_cfg = _tiny(
        "t5_base_dense_continue",
        init_from="scratch",
        total_steps=60,
        **{"optimizer.step_offset": 0, "eval_every": 60},
    )
    dense = train_and_evaluate(dense_cfg, str(tmp_path / "dense"))
    assert dense["status"] == "done" and dense["eval"]["loss"] < math.log(128)
    ckpt = str(tmp_path / "dense" / "checkpoints" / "60")

    # 2. The dense model's loss at that checkpoint: its first step, continued.
    base = _first_step("t5_base_dense_continue", ckpt, tmp_path / "continue")

    # 3a. Upcycled with the paper's routers (expert choice C = 2 with unnormalised weights, top-2
    # without renormalisation): not the dense function (a token may get 0..E experts and its
    # weights do not sum to 1), so only a finite, trainable start is asserted.
    paper = _first_step("t5_base_upcycle", ckpt, tmp_path / "paper")
    assert np.isfinite(paper["cross_entropy"]) and np.isfinite(paper["grad_norm"])
    assert paper["router/dropped_fraction"] >= 0.0

    # 3b. Upcycled with routers that keep the dense function (every expert takes every token
    # and the weights are normalised; top-2 renormalised and dropless): the same loss.
    e = 4
    preserving = _first_step(
        "t5_base_upcycle",
        ckpt,
        tmp_path / "preserving",
        **{
            "model.encoder_moe.capacity_factor": float(e),
            "model.encoder_moe.eval_capacity_factor": float(e),
            "model.encoder_moe.normalize_combine_weights": True,
            "model.decoder_moe.capacity_factor": None,
            "model.decoder_moe.eval_capacity_factor": None,
            "model.decoder_moe.renormalize": True,
        },
    )
    assert preserving["router/dropped_fraction"] == 0.0
    # fp32: the experts' weighted sum Σ w_e·y = (Σ w_e)·y adds one rounding per expert to the
    # dense y, then through the rest of the network and a batch-mean cross-entropy.
    np.testing.assert_allclose(preserving["cross_entropy"], base["cross_entropy"], rtol=1e-5)
    print(
        f"dense loss at step 60: {base['cross_entropy']:.6f}; upcycled, paper routers: "
        f"{paper['cross_entropy']:.6f}; upcycled, preserving routers: "
        f"{preserving['cross_entropy']:.6f}"
    )


@pytest.mark.parametrize("arg", ["", ":qwen3", ":qwen2.5-0.5b", ":qwen2.5-1.5b", ":tiny"])
def test_qwen_fine_grained_settings(arg):
    """E24S2G8T6 (Qwen3: E24S0G8T8) on every other block, renormalised dropless top-K, the
    shared experts gated for Qwen2-MoE; the recipe keeps the dense function."""
    c = load_config(path("qwen_moe_fine_grained") + arg)
    spec = resolve("qwen_moe_fine_grained", c)
    cfg, recipe = spec.config, spec.recipe
    moe, f = cfg.moe, spec.dense_config.intermediate_size
    qwen3 = arg == ":qwen3"
    assert recipe.name == ("E24S0G8T8" if qwen3 else "E24S2G8T6")
    assert recipe.preserves_dense_function
    assert moe.sparse_layers(cfg.num_hidden_layers) == every_other(cfg.num_hidden_layers)
    assert (moe.num_experts, moe.expert_mlp_dim) == (24, f // 8)
    assert (moe.num_shared_experts, moe.shared_expert_gate) == ((0, False) if qwen3 else (2, True))
    assert (moe.ordering, moe.renormalize, moe.capacity_factor) == (
        "softmax_then_topk",
        True,
        None,
    )
    if arg == ":qwen2.5-1.5b":
        assert (cfg.hidden_size, f, cfg.num_hidden_layers) == (1536, 8960, 28)


def test_qwen_tiny_upcycle_verify_from_our_own_dense_qwen2(tmp_path, capsys):
    """The README's path, shortened: a tiny dense Qwen2 trained here, exported as an HF
    directory, upcycled with the default config (architecture from the directory) and
    verified to compute the dense function."""
    from sparse_upcycle import cli

    config = path("qwen_moe_fine_grained")
    dense = str(tmp_path / "dense")
    overrides = ["--config.total_steps=3", "--config.checkpoint.every=3", "--config.eval_every=3"]
    overrides += ["--config.optimizer.warmup_steps=1"]
    assert (
        cli.main(
            ["train", "--config", config + ":tiny_dense", "--config.init_from=scratch"]
            + overrides
            + ["--workdir", dense]
        )
        == 0
    )
    hf = str(tmp_path / "hf")
    export = ["export", "--src", f"{dense}/checkpoints/3", "--dst", hf]
    assert cli.main([*export, "--config", config + ":tiny_dense"]) == 0
    moe = str(tmp_path / "moe")
    assert cli.main(["upcycle", "--config", config, "--src", hf, "--dst", moe]) == 0
    capsys.readouterr()
    assert cli.main(["verify", "--config", config, "--dense", hf, "--moe", moe]) == 0
    result = __import__("json").loads(capsys.readouterr().out)
    assert result["meant_to_preserve"] and result["ok"], result
    assert result["max_abs_delta"] < 1e-4  # float32 although the config trains in bfloat16
