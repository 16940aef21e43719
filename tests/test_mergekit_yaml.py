"""``sparse-upcycle upcycle --mergekit-yaml``: mergekit-moe configs as they are, and the router
initialisations from prompts (``router_init``).

The router rows are checked against transformers' own Llama forward (``output_hidden_states``:
the residual stream entering each layer) and the sources' torch embedding, not against our
model; the export is loaded by ``transformers.MixtralForCausalLM``.
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from sparse_upcycle import surgeon
from sparse_upcycle.cli import main

VOCAB = 64
LAYERS = 2
WORDS = "the cat sat on a mat dog ran in park code runs fast slow python list sort".split()
PROMPTS = {
    "a": (["the cat sat on a mat", "a dog ran in the park"], ["code runs fast"]),
    "b": (["python list sort", "code runs slow"], []),
}


def _tokenizer(path):
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok


def _llama(seed, config=transformers.LlamaConfig, model=transformers.LlamaForCausalLM):
    torch.manual_seed(seed)
    cfg = config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return model(cfg).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("mergekit")


@pytest.fixture(scope="module")
def llamas(work):
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = _llama(seed)
        path = str(work / name)
        model.save_pretrained(path)
        tok = _tokenizer(path)
        out[name] = (model, path)
    return out, tok


def _yaml(work, name, text):
    path = work / f"{name}.yml"
    path.write_text(text)
    return str(path)


def _experts_yaml(gate, models_, prompts=True, extra=""):
    lines = [
        f"base_model: {models_[0]}",
        f"gate_mode: {gate}",
        "dtype: bfloat16",
        extra,
        "experts:",
    ]
    for name, path in models_[1:]:
        lines.append(f"  - source_model: {path}")
        if prompts:
            pos, neg = PROMPTS[name]
            lines.append("    positive_prompts:")
            lines += [f"      - {json.dumps(p)}" for p in pos]
            if neg:
                lines.append("    negative_prompts:")
                lines += [f"      - {json.dumps(p)}" for p in neg]
    return "\n".join(lines) + "\n"


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _unit(v):
    return v / max(np.linalg.norm(v), 1e-8)


def _hf_layer_inputs(model, tok, prompt):
    """transformers' residual stream entering each layer for one prompt: [layers, L, d]."""
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
    return np.stack([h[0].double().numpy() for h in out.hidden_states[:LAYERS]])


def _want_rows(base, tok, gate):
    """[layers, E, d]: the router rows a gate mode should give (numpy, from transformers)."""
    rows = []
    for name in ("a", "b"):
        pos, neg = PROMPTS[name]

        def vec(prompts):
            if gate == "cheap_embed":
                table = base.model.embed_tokens.weight.double().detach().numpy()
                total = sum(table[tok.encode(p).ids].sum(0) for p in prompts)
                return np.stack([_unit(total)] * LAYERS)
            states = [_hf_layer_inputs(base, tok, p) for p in prompts]
            pick = [s.mean(1) if gate == "hidden_avg" else s[:, -1] for s in states]
            return sum(pick) / len(pick)

        v = vec(pos)
        if neg:
            v = v - vec(neg)
        rows.append(np.stack([_unit(r) for r in v]))
    return np.stack(rows, axis=1)


@pytest.mark.parametrize("gate", ["hidden", "hidden_avg", "cheap_embed"])
def test_router_rows_from_prompts_match_transformers(llamas, work, capsys, gate):
    (models_, tok) = llamas
    spec = [models_["a"][1], ("a", models_["a"][1]), ("b", models_["b"][1])]
    yml = _yaml(work, f"gate_{gate}", _experts_yaml(gate, spec))
    dst = str(work / f"moe_{gate}")
    rc, out, err = _run(capsys, "upcycle", "--mergekit-yaml", yml, "--dst", dst)
    assert rc == 0, err
    assert f"next: sparse-upcycle export --src {dst} --dst HF_DIR --dtype bfloat16" in out
    info, flat = surgeon.load_upcycled(dst)
    want = _want_rows(models_["a"][0], tok, gate)
    for layer in range(LAYERS):
        got = flat[f"layers_{layer}/mlp/router/w/kernel"].T  # [E, d]
        np.testing.assert_allclose(got, want[layer], atol=2e-5)
    # experts: a's MLP, then b's; attention from the base (a)
    sd_b = models_["b"][0].state_dict()
    np.testing.assert_array_equal(
        flat["layers_1/mlp/expert/wi_0/kernel"][1],
        sd_b["model.layers.1.mlp.gate_proj.weight"].numpy().T,
    )
    np.testing.assert_array_equal(
        flat["layers_0/attention/query/kernel"],
        models_["a"][0].state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy().T,
    )
    assert info["recipe"]["router_init"] == {"hidden": "hidden_last", "hidden_avg": "hidden"}.get(
        gate, gate
    )


def test_random_gates_and_identical_experts_export_to_the_dense_llama(llamas, work, capsys):
    (models_, _) = llamas
    a = models_["a"][1]
    spec = [a, ("a", a), ("a", a)]
    yml = _yaml(work, "same", _experts_yaml("random", spec, prompts=False))
    dst, hf = str(work / "same"), str(work / "same_hf")
    rc, out, err = _run(capsys, "upcycle", "--mergekit-yaml", yml, "--dst", dst)
    assert rc == 0, err
    assert "meant to preserve the dense function: True" in out
    _, flat = surgeon.load_upcycled(dst)
    router = flat["layers_0/mlp/router/w/kernel"]
    assert 0.7 < router.std() < 1.3  # torch.randn's scale, as mergekit's random gates
    assert _run(capsys, "export", "--src", dst, "--dst", hf)[0] == 0
    mixtral = transformers.MixtralForCausalLM.from_pretrained(hf).eval()
    ids = torch.from_numpy(np.random.default_rng(1).integers(2, VOCAB, (2, 9)))
    with torch.no_grad():
        want = models_["a"][0](input_ids=ids).logits.double().numpy()
        got = mixtral(input_ids=ids).logits.double().numpy()
    assert np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))) <= 1e-4


def test_uniform_random_is_torch_linear_default(llamas, work, capsys):
    (models_, _) = llamas
    spec = [models_["a"][1], ("a", models_["a"][1]), ("b", models_["b"][1])]
    yml = _yaml(work, "uniform", _experts_yaml("uniform_random", spec, prompts=False))
    dst = str(work / "uniform")
    assert _run(capsys, "upcycle", "--mergekit-yaml", yml, "--dst", dst)[0] == 0
    _, flat = surgeon.load_upcycled(dst)
    w = flat["layers_0/mlp/router/w/kernel"]
    bound = 1 / np.sqrt(32)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "base_model: A\nexperts: [{source_model: A}]\nmerge_method: x\n",
            "'merge_method' is not supported",
        ),
        (
            "base_model: A\ngate_mode: random\nexperts: [{source_model: A}, {source_model: A}]\n"
            "shared_experts: [{source_model: A}]\n",
            "mergekit would choose its DeepSeek MoE output here; set architecture: qwen",
        ),
        (
            "base_model: A\narchitecture: qwen\ngate_mode: random\n"
            "experts: [{source_model: A}, {source_model: A}]\n"
            "shared_experts: [{source_model: A}]\n",
            "from a 'llama' base is not supported",
        ),
        (
            "base_model: A\narchitecture: deepseek\ngate_mode: random\n"
            "experts: [{source_model: A}, {source_model: A}]\n",
            "architecture 'deepseek' is not supported",
        ),
        (
            "base_model: A\ngate_mode: random\n"
            "experts: [{source_model: A, noise_scale: 0.1}, {source_model: A}]\n",
            "noise_scale is not supported",
        ),
        (
            "base_model: A\ngate_mode: best\nexperts: [{source_model: A}, {source_model: A}]\n",
            "gate_mode 'best'",
        ),
        (
            "base_model: A\nexperts: [{source_model: A}, {source_model: A}]\n",
            "experts[0] has no positive_prompts",
        ),
        (
            "base_model: A\ngate_mode: random\nexperts: [{source_model: A}]\n",
            "1 expert(s) for experts_per_token=2",
        ),
        (
            "base_model: A\narchitecture: qwen\ngate_mode: random\n"
            "experts: [{source_model: A}, {source_model: A}]\n",
            "architecture qwen without shared_experts is mergekit's Qwen3 MoE",
        ),
        (
            "base_model: A\ngate_mode: random\n"
            "experts: [{source_model: A, tokenizer: x}, {source_model: A}]\n",
            "'tokenizer' is not supported",
        ),
        ("- not a mapping\n", "is a YAML mapping"),
        ("base_model: [\n", "not valid YAML"),
    ],
)
def test_unsupported_mergekit_fields_are_one_line(llamas, work, capsys, text, message):
    (models_, _) = llamas
    yml = _yaml(work, "bad", text.replace("A", models_["a"][1]))
    dst = work / "bad_out"
    rc, _, err = _run(capsys, "upcycle", "--mergekit-yaml", yml, "--dst", dst)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not dst.exists()


def test_mergekit_yaml_excludes_config_and_src(llamas, work, capsys):
    (models_, _) = llamas
    spec = [models_["a"][1], ("a", models_["a"][1]), ("b", models_["b"][1])]
    yml = _yaml(work, "ok", _experts_yaml("random", spec, prompts=False))
    rc, _, err = _run(
        capsys, "upcycle", "--mergekit-yaml", yml, "--src", models_["a"][1], "--dst", work / "x"
    )
    assert rc == 2 and "drop --config and --src" in err
    rc, _, err = _run(capsys, "upcycle", "--dst", work / "x")
    assert rc == 2 and "pass --config (with --src) or --mergekit-yaml" in err


def test_prompted_router_init_needs_a_tokenizer_and_prompts(llamas, work, capsys, tmp_path):
    (models_, _) = llamas
    no_tok = tmp_path / "no_tok"
    models_["a"][0].save_pretrained(no_tok)
    spec = [str(no_tok), ("a", str(no_tok)), ("b", str(no_tok))]
    yml = _yaml(work, "no_tok", _experts_yaml("cheap_embed", spec))
    rc, _, err = _run(capsys, "upcycle", "--mergekit-yaml", yml, "--dst", work / "y")
    assert rc == 2 and "no tokenizer.json" in err, err


# --------------------------------------------------------------------------------------------
# architecture: qwen with one shared expert -> Qwen2-MoE (mergekit moe/qwen.py's output).
# --------------------------------------------------------------------------------------------


def _qwen2(seed):
    return _llama(seed, transformers.Qwen2Config, transformers.Qwen2ForCausalLM)


@pytest.fixture(scope="module")
def qwens(work):
    out = {}
    for name, seed in (("qa", 5), ("qb", 6), ("qc", 7)):
        model = _qwen2(seed)
        path = str(work / name)
        model.save_pretrained(path)
        _tokenizer(path)
        out[name] = (model, path)
    return out


def _qwen_yaml(qwens, gate, shared_prompts=True):
    a, b, c = (qwens[n][1] for n in ("qa", "qb", "qc"))
    lines = [f"base_model: {a}", "architecture: qwen", f"gate_mode: {gate}", "dtype: bfloat16"]
    lines.append("experts:")
    for path, (pos, _) in ((a, PROMPTS["a"]), (b, PROMPTS["b"])):
        lines += [f"  - source_model: {path}", "    positive_prompts:"]
        lines += [f"      - {json.dumps(p)}" for p in pos]
    lines += ["shared_experts:", f"  - source_model: {c}"]
    if shared_prompts:
        lines += ["    positive_prompts:", '      - "python code runs fast"']
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("gate", ["random", "cheap_embed"])
def test_qwen_architecture_with_a_shared_expert_writes_qwen2_moe(qwens, work, capsys, gate):
    """Experts a, b from their sources, the shared expert c's MLP as it is, attention (with
    its biases), norms and embeddings from the base a; the shared gate a router row of its
    own (cheap_embed: the unit sum of the shared prompt's token embeddings, from torch); the
    config as mergekit's Qwen MoE writes it. transformers' Qwen2MoeForCausalLM loads and runs
    it."""
    yml = _yaml(work, f"qwen_{gate}", _qwen_yaml(qwens, gate))
    out = str(work / f"qwen_moe_{gate}")
    rc, printed, err = _run(
        capsys, "upcycle", "--mergekit-yaml", yml, "--dst", out, "--output-format", "hf"
    )
    assert rc == 0, err
    assert "Qwen2MoeForCausalLM (bfloat16" in printed, printed
    assert "meant to preserve the dense function: False" in printed
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts"] == 2
    assert cfg["num_experts_per_tok"] == 2 and cfg["norm_topk_prob"] is True
    assert cfg["moe_intermediate_size"] == cfg["shared_expert_intermediate_size"] == 48
    model = transformers.Qwen2MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = {k: v.float().numpy() for k, v in model.state_dict().items()}
    sd = {n: qwens[n][0].state_dict() for n in ("qa", "qb", "qc")}

    def bf16(t):
        return t.to(torch.bfloat16).float().numpy()

    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        experts = got[p + "mlp.experts.gate_up_proj"]  # [E, 2f, d]
        down = got[p + "mlp.experts.down_proj"]  # [E, d, f]
        for e, name in enumerate(("qa", "qb")):
            gate_w = bf16(sd[name][p + "mlp.gate_proj.weight"])
            up_w = bf16(sd[name][p + "mlp.up_proj.weight"])
            np.testing.assert_array_equal(experts[e], np.concatenate([gate_w, up_w]))
            np.testing.assert_array_equal(down[e], bf16(sd[name][p + "mlp.down_proj.weight"]))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(
                got[p + f"mlp.shared_expert.{proj}.weight"],
                bf16(sd["qc"][p + f"mlp.{proj}.weight"]),
            )
        for name in ("self_attn.q_proj.bias", "self_attn.k_proj.weight", "input_layernorm.weight"):
            np.testing.assert_array_equal(got[p + name], bf16(sd["qa"][p + name]))
        gate_row = got[p + "mlp.shared_expert_gate.weight"]
        assert gate_row.shape == (1, 32) and np.abs(gate_row).max() > 0
        if gate == "cheap_embed":
            table = qwens["qa"][0].model.embed_tokens.weight.double().detach().numpy()
            ids = _tokenizer_of(qwens).encode("python code runs fast").ids
            want = _unit(table[ids].sum(0))
            np.testing.assert_allclose(gate_row[0], want, atol=1e-2)  # bf16
            router = got[p + "mlp.gate.weight"]
            assert not np.allclose(router[0], gate_row[0], atol=1e-2)
        else:
            assert 0.5 < gate_row.std() < 1.5  # torch.randn's scale, as mergekit's
    ids = torch.from_numpy(np.random.default_rng(2).integers(3, VOCAB, (2, 7)))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    with open(os.path.join(out, surgeon.HF_RECIPE_FILE)) as f:
        recipe = json.load(f)["recipe"]
    assert recipe["shared_source"] == 2 and recipe["expert_sources"] == [0, 1]


def _tokenizer_of(qwens):
    return Tokenizer.from_file(os.path.join(qwens["qa"][1], "tokenizer.json"))


def test_qwen_shared_expert_refusals(qwens, work, capsys):
    text = _qwen_yaml(qwens, "cheap_embed", shared_prompts=False)
    rc, _, err = _run(
        capsys, "upcycle", "--mergekit-yaml", _yaml(work, "qwen_np", text), "--dst", work / "q"
    )
    assert rc == 2 and "shared_experts[0] has no positive_prompts" in err, err
    two = text.replace("shared_experts:\n", "shared_experts:\n  - source_model: x\n")
    rc, _, err = _run(
        capsys, "upcycle", "--mergekit-yaml", _yaml(work, "qwen_two", two), "--dst", work / "q"
    )
    assert rc == 2 and "shared_experts has 2 entries" in err, err
    assert not (work / "q").exists()
