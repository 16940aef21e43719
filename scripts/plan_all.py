"""``sparse-upcycle plan`` for every paper-scale config, at the topology its docstring names.

Each config runs in its own process (``python -m sparse_upcycle.plan``, which sets up its own
number of fake CPU devices), one after the other. Prints a markdown table; ``--json`` prints
the rows as one JSON list instead (config, devices, hbm, fits, mesh, the per-device bytes,
compile seconds, ...), ``--json FILE`` writes them there besides the table.

Topologies (``configs/_t5_common.py``, ``configs/_vit_common.py``,
``configs/llama_moe_8x_top2.py``): TPU v4 slices, 32 GiB of HBM per chip, for T5 (base on 32
chips, large on 64, XL on 128 with ``model=4``) and ViT (B/16 on 32, L/16 on 64); 256 H100 GPUs
of 80 GiB with ``expert=8, model=4`` for the Llama MoE.
The Llama config takes its architecture from an HF checkpoint (``model.name = "checkpoint"``);
here the named size it targets stands in for it (``--config.model.name=llama2-7b``).

    .venv/bin/python scripts/plan_all.py --json /tmp/plan_all.json > /tmp/plan_all.md
    .venv/bin/python scripts/plan_all.py --only t5_base,llama   # a subset (substrings of the path)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("dense_continue", "upcycle", "moe_scratch")
# (config stem, devices, HBM per device, overrides): the topology each config's docstring names
TARGETS: list[tuple[str, int, str, list[str]]] = [
    ("t5_base", 32, "32GiB", []),
    ("t5_large", 64, "32GiB", []),
    ("t5_xl", 128, "32GiB", []),
    ("vit_b16", 32, "32GiB", []),
    ("vit_l16", 64, "32GiB", []),
]
RUNS: list[tuple[str, int, str, list[str]]] = [
    (f"configs/{size}_{kind}.py", chips, hbm, extra)
    for size, chips, hbm, extra in TARGETS
    for kind in KINDS
] + [("configs/llama_moe_8x_top2.py", 256, "80GiB", ["--config.model.name=llama2-7b"])]


def _gib(n) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def plan_one(config: str, devices: int, hbm: str, overrides: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "sparse_upcycle.plan", "--config", config]
    cmd += ["--devices", str(devices), "--hbm", hbm, "--json", *overrides]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "config": config,
            "devices": devices,
            "hbm": hbm,
            "fits": None,
            "error": f"> {timeout} s",
        }
    row: dict = {"config": config, "devices": devices, "hbm": hbm, "overrides": overrides}
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["exit"] = out.returncode
    if out.returncode in (0, 1):
        report = json.loads(out.stdout)
        row.update(
            fits=report["fits"],
            mesh=report["mesh"],
            num_params=report["num_params"],
            per_device=report["per_device"],
            budget=report["budget"],
            flops_per_step=report["flops_per_step"],
            collectives=report["collectives"],
            compile_s=report["lower_s"] + report["compile_s"],
            top=report["top_consumers"][:3],
        )
    else:
        row["fits"] = None
        row["error"] = (out.stderr.strip().splitlines() or ["?"])[-1]
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| config | devices × HBM | mesh (data×fsdp×expert×model) | params/dev GiB | "
        "opt/dev GiB | temps/dev GiB | total/dev GiB | budget GiB | fits | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = os.path.basename(r["config"]).removesuffix(".py")
        where = f"{r['devices']} × {r['hbm']}"
        if r.get("fits") is None:
            lines.append(f"| {name} | {where} | | | | | | | error: {r.get('error')} | |")
            continue
        pd, m = r["per_device"], r["mesh"]
        axes = "×".join(str(m.get(a, 1)) for a in ("data", "fsdp", "expert", "model"))
        lines.append(
            f"| {name} | {where} | {axes} | {_gib(pd['params'])} | {_gib(pd['opt_state'])} | "
            f"{_gib(pd['temporaries'])} | {_gib(pd['total'])} | {_gib(r['budget'])} | "
            f"{'yes' if r['fits'] else '**no**'} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hbm", help="one device's memory for every config (default: its own)")
    parser.add_argument(
        "--only", default="", help="comma-separated: only configs whose path contains one of them"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per config")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        help="print the rows as one JSON list instead of the table, or with FILE write them there",
    )
    args = parser.parse_args()
    rows = []
    wanted = [w for w in args.only.split(",") if w] or [""]
    for config, devices, hbm, overrides in RUNS:
        if not any(w in config for w in wanted):
            continue
        row = plan_one(config, devices, args.hbm or hbm, overrides, args.timeout)
        print(f"{config}: fits={row.get('fits')} ({row.get('wall_s')} s)", file=sys.stderr)
        rows.append(row)
    if args.json == "-":
        print(json.dumps(rows, indent=2))
        return 0
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
