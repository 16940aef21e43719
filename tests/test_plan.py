"""``plan``: the real train step compiled for fake CPU devices, sized without arrays.

References are computed another way than the planner does: per-device parameter bytes from the
layout rule (experts split over the ``expert`` axis, everything else replicated on a mesh with
``model=1``), checked against XLA's own argument and alias sizes."""

import gc
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from sparse_upcycle import models, plan
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.config import ConfigError, load_config
from sparse_upcycle.task import resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "t5_base_upcycle.py") + ":tiny"
EXPERT4 = ["--config.mesh.expert=4"]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sparse_upcycle", "plan", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def report():
    config = load_config(CONFIG, EXPERT4)
    gc.collect()  # arrays earlier tests dropped (in reference cycles) are not counted
    before = {id(a) for a in jax.live_arrays()}
    out = plan.plan(config, 8, 2**30, name=CONFIG)
    # Nothing the size of the model was allocated (nor left behind) by planning.
    gc.collect()
    assert {id(a) for a in jax.live_arrays()} <= before
    return config, out


def test_bytes_follow_the_layout(report):
    config, r = report
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "expert": 4, "model": 1}
    spec = resolve_model(config)
    flat = flatten(models.get(spec.family).abstract_params(spec.config))
    sizes = {k: np.dtype(v.dtype).itemsize * int(np.prod(v.shape)) for k, v in flat.items()}
    experts = sum(n for k, n in sizes.items() if "/expert/" in k)
    assert experts > 0
    assert r["param_bytes"] == sum(sizes.values())
    assert r["num_params"] == sum(int(np.prod(v.shape)) for v in flat.values())
    # model=1: dense params replicated on every device, expert params split 4 ways on E.
    assert r["per_device"]["params"] == sum(sizes.values()) - experts + experts // 4
    assert r["batch"]["encoder_input_tokens"] == [16, 32]
    assert r["batch"]["decoder_target_tokens"] == [16, 8]


def test_compiled_sizes_agree(report):
    _, r = report
    pd = r["per_device"]
    state = pd["params"] + pd["opt_state"]
    # XLA's arguments: the state, the batch shard (16/8 rows) and two int32 scalars; jit drops
    # unused inputs (Adafactor's placeholder slots), hence the 1% slack.
    assert pd["batch"] == 2 * (32 + 3 * 8) * 4
    assert abs(pd["arguments"] - (state + pd["batch"] + 8)) <= 0.01 * pd["arguments"]
    assert 0.99 * state <= pd["aliased"] <= state + 8  # the donated state is updated in place
    assert pd["temporaries"] > 0
    assert pd["total"] == pd["arguments"] + pd["outputs"] - pd["aliased"] + pd["temporaries"]
    assert r["fits"] and r["budget"] == int(0.9 * 2**30)
    # Expert parallelism: tokens go to their experts' devices and back with all-to-alls.
    assert r["collectives"]["all-to-all"]["count"] >= 2
    assert r["collectives"]["all-to-all"]["bytes"] > 0
    assert r["flops_per_step"] > 0 and r["compile_s"] > 0
    assert r["top_consumers"][0]["kind"] == "temporaries"
    per = [row["bytes"] for row in r["top_consumers"]]
    assert per == sorted(per, reverse=True)


def test_does_not_fit_reexec(capfd):
    """Asked for more devices than this process has, the command reruns itself; a budget
    below the step's total is exit 1 with the consumers listed."""
    assert len(jax.devices()) == 8  # conftest: the backend is up with 8 devices
    args = SimpleNamespace(config=CONFIG, devices=16, hbm=2**20, headroom=0.1, json=True)
    assert plan.run(args, EXPERT4) == 1
    r = json.loads(capfd.readouterr().out)
    assert r["devices"] == 16 and r["mesh"]["data"] == 4
    assert not r["fits"] and r["over_by"] == r["per_device"]["total"] - r["budget"] > 0
    assert {row["kind"] for row in r["top_consumers"]} >= {"params", "temporaries"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hbm", "lots"], "argument --hbm: expected a size such as 32GiB"),
        (["--hbm", "0GB"], "argument --hbm: expected a size of at least 1 byte"),
        (["--hbm", "32GiB", "--headroom", "1"], "argument --headroom: expected a number in"),
        (["--hbm", "32GiB", "--config.mesh.expret=4"], "unknown field config.mesh.expret"),
        (["--hbm", "32GiB", "--config.data.batch_size=12"], "batch_size=12 must be a positive"),
        (
            ["--hbm", "32GiB", "--config.model.encoder_moe.group_multiple=0"],
            "moe.group_multiple must be an integer >= 1, got 0",
        ),
    ],
)
def test_bad_input_is_one_line(args, message, capsys):
    try:
        code = plan.main(["--config", CONFIG, "--devices", "8", *args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-upcycle: error:"), err
    assert message in lines[0]


def test_bad_mesh_in_a_fresh_process():
    """As a command: one line on stderr (no warning, no traceback), exit 2."""
    out = _cli("--config", CONFIG, "--devices", "8", "--hbm", "32GiB", "--config.mesh.expert=3")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("sparse-upcycle: error: mesh:"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_parse_bytes():
    assert plan.parse_bytes("32GiB") == 32 * 2**30
    assert plan.parse_bytes("80GB") == 80 * 10**9
    assert plan.parse_bytes("16e9") == 16 * 10**9
    assert plan.parse_bytes("1.5 mib") == 3 * 2**19
    for bad in ("", "GB", "-1GB", "1e999", "3 parsecs", "1.2.3GB"):
        with pytest.raises(ValueError):
            plan.parse_bytes(bad)


def test_checkpoint_model_needs_a_source():
    config = load_config(os.path.join(ROOT, "configs", "llama_moe_8x_top2.py"))
    with pytest.raises(ConfigError, match="--config.model.name=NAME"):
        plan.plan(config, 8, 2**30)


def test_collectives_from_hlo_text():
    hlo = "\n".join(
        [
            "  %all-to-all.3 = (bf16[2,4]{1,0}, bf16[2,4]{1,0}) all-to-all(%a, %b), channel_id=1",
            "  %ag-start = (f32[8]{0}, f32[64]{0}) all-gather-start(f32[8]{0} %p), dimensions={0}",
            "  %ag-done = f32[64]{0} all-gather-done((f32[8]{0}, f32[64]{0}) %ag-start)",
            "  ROOT %all-reduce.1 = f32[] all-reduce(f32[] %x), to_apply=%add",
            "  %fusion = f32[3]{0} fusion(f32[3]{0} %all-reduce.1), kind=kLoop",
        ]
    )
    c = plan.count_collectives(hlo)
    assert c["all-to-all"] == {"count": 1, "bytes": 2 * 2 * 4 * 2}
    assert c["all-gather"] == {"count": 1, "bytes": 64 * 4}
    assert c["all-reduce"] == {"count": 1, "bytes": 4}
    assert c["reduce-scatter"] == {"count": 0, "bytes": 0}


def test_medium_paper_config_on_8_devices():
    """A paper config as shipped (32 experts in every other block, expert choice / top-2 routers,
    ``dots_saveable`` remat, bfloat16 activations) at T5-small width (d=512) and 4 + 4 layers,
    ~0.2B parameters, planned for 8 devices with ``expert=8``: nothing is allocated, each
    device holds a 1/8 of every expert kernel and all of the rest, and it fits 32 GiB."""
    flags = ["--config.model.name=small", "--config.mesh.expert=8"]
    flags += ["--config.model.overrides.num_encoder_layers=4"]
    flags += ["--config.model.overrides.num_decoder_layers=4"]
    flags += ["--config.data.batch_size=16", "--config.data.seq_len=128"]
    flags += ["--config.data.target_len=32"]
    # 8 routing groups per stack (of 2048 and 512 tokens), one per device: groups are what the
    # expert axis splits, a single group would be routed whole on every device
    flags += ["--config.model.encoder_moe.group_multiple=8"]
    flags += ["--config.model.decoder_moe.group_multiple=8"]
    config = load_config(os.path.join(ROOT, "configs", "t5_base_upcycle.py"), flags)
    assert config.model.remat == "dots_saveable"
    r = plan.plan(config, 8, 32 * 2**30, name="t5_base_upcycle small")
    assert r["mesh"] == {"data": 1, "expert": 8, "model": 1}
    spec = resolve_model(config)
    flat = flatten(models.get(spec.family).abstract_params(spec.config))
    sizes = {k: np.dtype(v.dtype).itemsize * int(np.prod(v.shape)) for k, v in flat.items()}
    experts = sum(n for k, n in sizes.items() if "/expert/" in k)
    # 2 + 2 MoE layers x 32 experts x 3 gated-GELU kernels of 512 x 1024
    assert experts == 4 * 32 * 3 * 512 * 1024 * 4
    assert r["per_device"]["params"] == sum(sizes.values()) - experts + experts // 8
    assert r["fits"] and 0 < r["per_device"]["temporaries"] < r["budget"]
    # at least the forward pass's two all-to-alls (to the experts and back) per MoE layer
    assert r["collectives"]["all-to-all"]["count"] >= 2 * 4
