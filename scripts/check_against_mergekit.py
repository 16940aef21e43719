"""Our ``upcycle --mergekit-yaml … --output-format hf`` against mergekit-moe itself, tensor by
tensor, on the same YAML (JSON on stdout).

    python scripts/check_against_mergekit.py --mergekit /path/to/mergekit-venv/bin/mergekit-moe \
        [--workdir /tmp/check_mergekit]

Needs the test extra (torch, transformers) to make the models: three tiny random Llamas and
three tiny random Qwen2s (hidden 32, 2 layers, a word-level ``tokenizer.json`` with ``<s>`` as
BOS/pad). Two jobs: Mixtral from the Llamas with ``gate_mode: cheap_embed`` (deterministic
gates: prompt embeddings) and negative prompts; Qwen2-MoE from the Qwen2s with
``architecture: qwen`` and one shared expert. Ours is written in the layout mergekit 0.1.5
writes with transformers 5 (Mixtral fused, Qwen2-MoE per expert); every tensor present in both
is compared (largest absolute difference), and the tensor names and ``config.json`` keys that
differ are listed. mergekit-moe 0.1.5 loads a shared expert's model only when it is also an
expert's or the base's, so the shared expert here is one of the experts' sources.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import emit  # noqa: E402

WORDS = "the cat sat on a mat dog ran in park code runs fast slow python list sort".split()
MIXTRAL = """base_model: llama0
gate_mode: cheap_embed
dtype: float32
experts:
  - source_model: llama0
    positive_prompts: ["the cat sat on a mat", "a dog ran in the park"]
    negative_prompts: ["code runs fast"]
  - source_model: llama1
    positive_prompts: ["python list sort", "code runs slow"]
  - source_model: llama2
    positive_prompts: ["sort the list"]
"""
QWEN = """base_model: qwen0
architecture: qwen
gate_mode: cheap_embed
dtype: float32
experts:
  - source_model: qwen0
    positive_prompts: ["the cat sat on a mat"]
  - source_model: qwen1
    positive_prompts: ["python list sort"]
shared_experts:
  - source_model: qwen1
    positive_prompts: ["code runs fast"]
"""


def _models(work: str) -> None:
    import torch
    import transformers as t
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    for family, config, model in (
        ("llama", t.LlamaConfig, t.LlamaForCausalLM),
        ("qwen", t.Qwen2Config, t.Qwen2ForCausalLM),
    ):
        for seed in range(3):
            path = os.path.join(work, f"{family}{seed}")
            if os.path.isfile(os.path.join(path, "config.json")):
                continue
            torch.manual_seed(seed)
            cfg = config(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=1,
            )
            model(cfg).eval().save_pretrained(path)
            tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A", special_tokens=[("<s>", 1)]
            )
            tok.save(os.path.join(path, "tokenizer.json"))
            side = {"bos_token": "<s>", "eos_token": "<s>", "unk_token": "<unk>"}
            side.update(pad_token="<s>", tokenizer_class="PreTrainedTokenizerFast")
            with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
                json.dump(side, f)


def _tensors(directory: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def _compare(theirs: str, ours: str) -> dict:
    a, b = _tensors(theirs), _tensors(ours)
    diffs = {}
    for key in sorted(set(a) & set(b)):
        if a[key].shape != b[key].shape:
            diffs[key] = f"shape {a[key].shape} vs {b[key].shape}"
            continue
        d = a[key].astype(np.float64) - b[key].astype(np.float64)
        diffs[key] = float(np.max(np.abs(d))) if d.size else 0.0
    with open(os.path.join(theirs, "config.json")) as f:
        ca = json.load(f)
    with open(os.path.join(ours, "config.json")) as f:
        cb = json.load(f)
    numeric = [v for v in diffs.values() if isinstance(v, float)]
    return {
        "tensors_compared": len(diffs),
        "only_mergekit": sorted(set(a) - set(b)),
        "only_ours": sorted(set(b) - set(a)),
        "max_abs_diff": max(numeric) if numeric else None,
        "differing_over_1e-6": {
            k: v for k, v in diffs.items() if not isinstance(v, float) or v > 1e-6
        },
        "config_keys_differing": {
            k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="the mergekit-moe executable")
    parser.add_argument("--workdir", default="/tmp/check_mergekit")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    _models(work)
    ours_cli = os.path.join(os.path.dirname(sys.executable), "sparse-upcycle")
    result = {}
    jobs = (
        ("mixtral_cheap_embed", MIXTRAL, "fused"),
        ("qwen2_moe_shared_expert", QWEN, "per_expert"),
    )
    for job, text, layout in jobs:
        yml = os.path.join(work, f"{job}.yml")
        with open(yml, "w") as f:
            f.write(text)
        theirs, ours = os.path.join(work, f"{job}_mergekit"), os.path.join(work, f"{job}_ours")
        shutil.rmtree(theirs, ignore_errors=True)
        for argv in (
            [args.mergekit, yml, theirs],
            [ours_cli, "upcycle", "--mergekit-yaml", yml, "--dst", ours, "--overwrite"]
            + ["--output-format", "hf", "--moe-layout", layout],
        ):
            done = subprocess.run(argv, cwd=work, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{argv[0]} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        result[job] = _compare(theirs, ours)
    emit(result, args.out)


if __name__ == "__main__":
    main()
