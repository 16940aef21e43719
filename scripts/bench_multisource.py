"""Several dense sources into one MoE: our upcycle against mergekit-moe on the same job (JSON).

    python scripts/bench_multisource.py --workdir /tmp/bench_ms \
        --mergekit /tmp/mergekit-venv/bin/mergekit-moe [--copies 1] [--repeats 2] [--check]

The job (issue 19 item 5): a Llama of random weights (hidden 1024, intermediate 4096, 8 layers,
vocab 32000, fp32, ~0.4B parameters with its untied head) made into 8 experts, top-2, random
router, every layer: a mergekit-moe YAML (``base_model``, ``gate_mode: random``,
``dtype: float32``, eight ``experts`` entries) that both tools read as it is. ``--copies 1``
names one source directory eight times (the job measured in the issue); ``--copies 8`` makes
eight directories, the first the base and the others with their MLP weights perturbed.

Arms, each run as its own process, interleaved over ``--repeats`` rounds (medians reported):
``mergekit`` (``mergekit-moe CONFIG OUT``, installed in a venv of its own), ``ours_one_pass``
(``sparse-upcycle upcycle --mergekit-yaml CONFIG --dst OUT --output-format hf``) and, as a
reference, ``ours_two_step`` (``upcycle`` to our layout, then ``export``). Wall time is the
process's; peak RSS is the kernel's ``ru_maxrss`` of that process (``os.wait4``). The sources
are read once before the first round so that every arm finds them in the page cache. Each run
starts after an untimed ``sync`` (no other run's output left to write back; the order of the
arms alternates between rounds), and ``seconds_to_disk`` adds the ``sync`` after it (its
output on the disk, not only in the page cache); ``time_per_round`` is the ratio of each
round's two back-to-back runs. With
``--check`` (needs transformers and torch: the test extra), each output's logits on one batch
are compared with the dense Llama's (``--copies 1``: identical experts compute the dense
function, so the largest difference relative to the largest logit must be <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import emit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _dense_llama(path: str, args, seed: int, base: str | None = None) -> None:
    """A LlamaForCausalLM directory with random fp32 weights (safetensors, 2 GB shards), a
    WordLevel tokenizer.json over the vocabulary; with ``base``, a copy of the base whose MLP
    weights are perturbed."""
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer, models

    os.makedirs(path, exist_ok=True)
    if base is not None:
        rng = np.random.default_rng(seed)
        for name in sorted(os.listdir(base)):
            if not name.endswith(".safetensors"):
                shutil.copy2(os.path.join(base, name), os.path.join(path, name))
                continue
            tensors = load_file(os.path.join(base, name))
            for key, value in tensors.items():
                if ".mlp." in key:
                    noise = rng.standard_normal(value.shape, dtype=np.float32)
                    tensors[key] = value + np.float32(0.002) * noise
            save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        return
    d, f, v, n = args.hidden, args.intermediate, args.vocab, args.layers
    heads, kv = d // 64, max(1, d // 128)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 64,
        "vocab_size": v,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, v)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(os.path.join(path, "tokenizer.json"))
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": np.ones(d, np.float32)}
    tensors["lm_head.weight"] = w(v, d)
    shard, index, shard_bytes = 0, {}, 0
    pending: dict[str, np.ndarray] = {}

    def flush():
        nonlocal shard, pending, shard_bytes
        if pending:
            name = f"model-{shard:05d}.safetensors"
            save_file(pending, os.path.join(path, name), metadata={"format": "pt"})
            index.update(dict.fromkeys(pending, name))
            shard, pending, shard_bytes = shard + 1, {}, 0

    def put(name, value):
        nonlocal shard_bytes
        pending[name] = value
        shard_bytes += value.nbytes
        if shard_bytes >= 2 << 30:
            flush()

    for name, value in tensors.items():
        put(name, value)
    for i in range(n):
        p = f"model.layers.{i}."
        put(p + "input_layernorm.weight", np.ones(d, np.float32))
        put(p + "post_attention_layernorm.weight", np.ones(d, np.float32))
        put(p + "self_attn.q_proj.weight", w(heads * 64, d))
        put(p + "self_attn.k_proj.weight", w(kv * 64, d))
        put(p + "self_attn.v_proj.weight", w(kv * 64, d))
        put(p + "self_attn.o_proj.weight", w(d, heads * 64))
        put(p + "mlp.gate_proj.weight", w(f, d))
        put(p + "mlp.up_proj.weight", w(f, d))
        put(p + "mlp.down_proj.weight", w(d, f))
    flush()
    # shards named as transformers expects, with their index
    total = len([n for n in set(index.values())])
    names = {}
    for k in range(total):
        old = f"model-{k:05d}.safetensors"
        new = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        os.rename(os.path.join(path, old), os.path.join(path, new))
        names[old] = new
    weight_map = {key: names[file] for key, file in index.items()}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh, indent=2)


def _yaml(path: str, sources: list[str], experts: int) -> None:
    lines = [
        f"base_model: {sources[0]}",
        "gate_mode: random",
        "dtype: float32",
        "experts_per_token: 2",
        "experts:",
    ]
    for j in range(experts):
        lines.append(f"  - source_model: {sources[j % len(sources)]}")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _timed(argv: list[str], log: str) -> dict:
    """Run ``argv``; its wall seconds and peak RSS (the kernel's, through ``os.wait4``)."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(log) as fh:
            tail = fh.read()[-3000:]
        raise SystemExit(f"{argv[0]} failed ({code}):\n{tail}")
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3)}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _check(dense: str, outputs: dict[str, str], vocab: int) -> dict:
    import torch
    import transformers

    ids = torch.from_numpy(np.random.default_rng(0).integers(3, vocab, (1, 16)))
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(dense).eval()
        want = model(input_ids=ids).logits.double().numpy()
        del model
        result = {}
        for arm, path in outputs.items():
            model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            got = model(input_ids=ids).logits.double().numpy()
            del model
            result[arm] = {
                "class": transformers.AutoConfig.from_pretrained(path).architectures[0],
                "max_rel_diff_vs_dense": float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_multisource")
    parser.add_argument("--mergekit", help="the mergekit-moe executable (a venv of its own)")
    parser.add_argument("--copies", type=int, default=1, help="distinct source directories")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--two-step", action="store_true", help="also time upcycle + export")
    parser.add_argument("--check", action="store_true", help="logits vs the dense model")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    sources = [os.path.join(work, f"src{i}") for i in range(args.copies)]
    t0 = time.perf_counter()
    for i, path in enumerate(sources):
        if not os.path.isfile(os.path.join(path, "config.json")):
            _dense_llama(path, args, seed=i, base=None if i == 0 else sources[0])
    made = time.perf_counter() - t0
    config = os.path.join(work, "moe.yml")
    _yaml(config, sources, args.experts)
    for path in sources:  # into the page cache, for every arm alike
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as fh:
                while fh.read(64 << 20):
                    pass

    ours = os.path.join(os.path.dirname(sys.executable), "sparse-upcycle")
    arms: dict[str, list[list[str]]] = {}
    if args.mergekit:
        arms["mergekit"] = [
            [args.mergekit, config, "{out}", "--i-understand-this-is-not-useful-without-training"]
        ]
    arms["ours_one_pass"] = [
        [ours, "upcycle", "--mergekit-yaml", config, "--dst", "{out}", "--output-format", "hf"]
    ]
    if args.two_step:
        arms["ours_two_step"] = [
            [ours, "upcycle", "--mergekit-yaml", config, "--dst", "{out}.orbax"],
            [ours, "export", "--src", "{out}.orbax", "--dst", "{out}", "--dtype", "float32"],
        ]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    outputs = {}
    for r in range(args.repeats):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]  # no arm always goes first
        for arm in order:
            stages = arms[arm]
            out = os.path.join(work, f"out_{arm}")
            for leftover in (out, out + ".orbax"):
                shutil.rmtree(leftover, ignore_errors=True)
            os.sync()  # untimed: every run starts with nothing of another run left to write back
            measured = []
            for k, stage in enumerate(stages):
                argv = [a.replace("{out}", out) for a in stage]
                measured.append(_timed(argv, os.path.join(work, f"{arm}.{r}.{k}.log")))
            start = time.perf_counter()
            os.sync()  # what the run left in the page cache, written to the disk
            synced = time.perf_counter() - start
            seconds = sum(m["seconds"] for m in measured)
            runs[arm].append(
                {
                    "seconds": round(seconds, 2),
                    "seconds_to_disk": round(seconds + synced, 2),
                    "peak_rss_gb": max(m["peak_rss_gb"] for m in measured),
                    "stages": measured,
                    "output_gb": round(_dir_bytes(out) / 1e9, 3),
                }
            )
            shutil.rmtree(out + ".orbax", ignore_errors=True)
            outputs[arm] = out

    def median(arm, key):
        return statistics.median(run[key] for run in runs[arm])

    summary = {
        arm: {key: median(arm, key) for key in ("seconds", "seconds_to_disk", "peak_rss_gb")}
        for arm in arms
    }
    result = {
        "job": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "vocab": args.vocab,
            "experts": args.experts,
            "distinct_sources": args.copies,
            "dtype": "float32",
            "source_gb": round(sum(_dir_bytes(p) for p in sources) / 1e9, 3),
            "seconds_to_make_sources": round(made, 1),
        },
        "machine": {"cpus": os.cpu_count(), "repeats": args.repeats},
        "median": summary,
        "runs": runs,
    }
    if "mergekit" in summary:
        base = summary["mergekit"]
        result["ours_over_mergekit"] = {
            arm: {
                "time": round(s["seconds"] / base["seconds"], 3),
                "time_to_disk": round(s["seconds_to_disk"] / base["seconds_to_disk"], 3),
                # the same ratio round by round (each round runs both, back to back)
                "time_per_round": [
                    round(a["seconds"] / b["seconds"], 3)
                    for a, b in zip(runs[arm], runs["mergekit"], strict=True)
                ],
                "peak_rss": round(s["peak_rss_gb"] / base["peak_rss_gb"], 3),
            }
            for arm, s in summary.items()
            if arm != "mergekit"
        }
    if args.check:
        result["check"] = _check(sources[0], outputs, args.vocab)
    emit(result, args.out)


if __name__ == "__main__":
    main()
