"""Byte-identity check for refactors: upcycle outputs and a short compare's report, hashed.

    .venv/bin/python scripts/identity_check.py --sources /tmp/idsrc --out /tmp/id_before.json
    # ... refactor ...
    .venv/bin/python scripts/identity_check.py --sources /tmp/idsrc --out /tmp/id_after.json
    .venv/bin/python scripts/identity_check.py --diff /tmp/id_before.json /tmp/id_after.json

The dense sources (a big_vision-layout ViT .npz, a T5X checkpoint, a Hugging Face Llama saved
with safetensors) are written once into ``--sources`` (random weights, fixed seeds) and reused
as they are, so both runs read the same bytes whatever the code that wrote them. Each case runs
``sparse-upcycle upcycle`` (copy, virtual_group, drop; optimizer tiling; kept step) in a fresh
process and hashes every output file; ``recipe.json`` is hashed after dropping the fields that
name the machine or the run (absolute paths, the package version). Then it runs the test
suite's tiny ``compare`` (fixed seeds) and hashes ``report.json`` without its wall times.
Prints and writes one JSON object: ``{case: {file: sha256}}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CLI = [sys.executable, "-m", "sparse_upcycle"]
TINY = os.path.join(REPO, "configs", "upcycle_tiny.py")

CASES = {
    "vit_copy": ("vit", "vit.npz", []),
    "vit_drop": (
        "vit",
        "vit.npz",
        ["--config.upcycle.method=drop", "--config.upcycle.drop_ratio=0.5"],
    ),
    "t5_copy": ("t5", "checkpoint_100", []),
    "t5_tile_keep": (
        "t5",
        "checkpoint_700",
        ["--config.upcycle.optimizer=tile", "--config.upcycle.step=keep"],
    ),
    "t5_noise": (
        "t5",
        "checkpoint_100",
        ["--config.upcycle.noise_std=0.01", "--config.upcycle.seed=3"],
    ),
    "llama_copy": ("decoder", "llama", ["--config.model.name=checkpoint"]),
    "llama_virtual_group": (
        "decoder",
        "llama",
        [
            "--config.model.name=checkpoint",
            "--config.upcycle.method=virtual_group",
            "--config.upcycle.expansion=2",
            "--config.upcycle.granularity=2",
            "--config.upcycle.k=2",
            "--config.upcycle.scaling=exact",
            "--config.upcycle.ordering=topk_then_softmax",
        ],
    ),
}


def make_sources(d: str) -> None:
    """Writes the dense sources once (never overwritten: later runs reuse the same bytes)."""
    import jax
    import numpy as np
    from flax import nnx

    from sparse_upcycle.checkpoints.t5x import write_t5x
    from sparse_upcycle.checkpoints.tree import flatten
    from sparse_upcycle.models import t5, vit

    def params(model):
        return flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))

    os.makedirs(d, exist_ok=True)
    if not os.path.exists(os.path.join(d, "vit.npz")):
        model = vit.ViT(vit.config("tiny", head_zeroinit=False), rngs=nnx.Rngs(0))
        np.savez(os.path.join(d, "vit.npz"), **params(model))
    if not os.path.exists(os.path.join(d, "checkpoint_100")):
        write_t5x(
            os.path.join(d, "checkpoint_100"),
            params(t5.T5(t5.config("tiny"), rngs=nnx.Rngs(0))),
            step=100,
        )
    if not os.path.exists(os.path.join(d, "llama")):
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        transformers.LlamaForCausalLM(cfg).save_pretrained(os.path.join(d, "llama"))
    if not os.path.exists(os.path.join(d, "checkpoint_700")):
        # T5X with Adafactor slots (factored v_row/v_col for matrices, v for vectors).
        rng = np.random.default_rng(0)
        flat = params(t5.T5(t5.config("tiny"), rngs=nnx.Rngs(0)))
        slots = {}
        for path, p in flat.items():
            one = np.zeros((1,), np.float32)
            if p.ndim >= 2:
                slots[f"{path}/v_row"] = rng.random(p.shape[:-1]).astype(np.float32)
                slots[f"{path}/v_col"] = rng.random(p.shape[:-2] + p.shape[-1:]).astype(np.float32)
                slots[f"{path}/v"] = one
            else:
                slots[f"{path}/v_row"], slots[f"{path}/v_col"] = one, one
                slots[f"{path}/v"] = rng.random(p.shape).astype(np.float32)
        write_t5x(os.path.join(d, "checkpoint_700"), flat, step=700, param_states=slots)


def digest_tree(path: str, drop=()) -> dict[str, str]:
    """sha256 per file, except an Orbax checkpoint directory (its file names and metadata
    carry random ids and times), which is hashed per tensor: dtype, shape and bytes of every
    leaf as Orbax itself restores them (not through this package's reader)."""
    out = {}
    for root, dirs, files in os.walk(path):
        if os.path.isfile(os.path.join(root, "state", "_METADATA")):
            out.update(_digest_orbax(root, os.path.relpath(root, path)))
            dirs[:] = []  # not its files
            continue
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, path)
            if f.endswith(".json"):
                data = json.load(open(p))
                for key in drop:
                    _drop(data, key.split("."))
                blob = json.dumps(data, sort_keys=True).encode()
            else:
                blob = open(p, "rb").read()
            out[rel] = hashlib.sha256(blob).hexdigest()
    return dict(sorted(out.items()))


def _digest_orbax(directory: str, rel: str) -> dict[str, str]:
    import numpy as np
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(os.path.join(directory, "state"))
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k in sorted(node):
                walk(node[k], f"{prefix}/{k}")
            return
        a = np.asarray(node)
        h = hashlib.sha256(f"{a.dtype}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
        out[f"{rel}:{prefix}"] = h.hexdigest()

    walk(tree, "")
    return out


def _drop(data, path):
    if not isinstance(data, dict) or not path:
        return
    if len(path) == 1:
        data.pop(path[0], None)
        return
    if path[0] == "*":
        for v in data.values():
            _drop(v, path[1:])
    elif path[0] == "[]":
        for v in data.get(path[1], []) if isinstance(data, dict) else []:
            _drop(v, path[2:])
    else:
        _drop(data.get(path[0]), path[1:])


RECIPE_VOLATILE = ("package_version", "source.path", "dst", "created")
REPORT_VOLATILE = (
    "files",
    "dense.wall_seconds",
    "dense.checkpoint",
    "[].runs.wall_seconds",
    "aggregate.*.wall_seconds",
)


def run(sources: str, keep_report: str | None = None) -> dict:
    make_sources(sources)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, src, extra) in CASES.items():
            dst = os.path.join(tmp, name)
            p = subprocess.run(
                [
                    *CLI,
                    "upcycle",
                    "--config",
                    f"{TINY}:{family}",
                    "--src",
                    os.path.join(sources, src),
                    "--dst",
                    dst,
                    *extra,
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if p.returncode:
                raise SystemExit(f"{name}: upcycle exited {p.returncode}: {p.stderr[-500:]}")
            result[name] = digest_tree(dst, RECIPE_VOLATILE)
        wd = os.path.join(tmp, "compare")
        p = subprocess.run(
            [
                *CLI,
                "compare",
                "--config",
                os.path.join(REPO, "tests", "configs", "compare_tiny.py"),
                "--workdir",
                wd,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "SPARSE_UPCYCLE_JAX_CACHE": ""},
        )
        if p.returncode:
            raise SystemExit(f"compare exited {p.returncode}: {p.stderr[-500:]}")
        report = json.load(open(os.path.join(wd, "report.json")))
        for key in REPORT_VOLATILE:
            _drop(report, key.split("."))
        if keep_report:
            with open(keep_report, "w") as f:
                json.dump(report, f, indent=1, sort_keys=True)
        result["compare_report"] = {
            "report.json": hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()
        }
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources")
    ap.add_argument("--out")
    ap.add_argument("--diff", nargs=2)
    a = ap.parse_args(argv)
    if a.diff:
        x, y = (json.load(open(f)) for f in a.diff)
        bad = {
            c: sorted(set(x.get(c, {}).items()) ^ set(y.get(c, {}).items()))
            for c in set(x) | set(y)
        }
        bad = {c: v for c, v in bad.items() if v}
        print(
            json.dumps(
                {
                    "identical": not bad,
                    "cases": len(x),
                    "files": sum(map(len, x.values())),
                    "differ": bad,
                },
                indent=1,
            )
        )
        return 0 if not bad else 1
    r = run(os.path.abspath(a.sources), a.out and a.out + ".report.json")
    text = json.dumps(r, indent=1, sort_keys=True)
    if a.out:
        open(a.out, "w").write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
