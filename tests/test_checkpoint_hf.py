"""Hugging Face safetensors reader on directories written by transformers' save_pretrained."""

import json

import numpy as np
import pytest
import torch
import transformers

from sparse_upcycle.checkpoints import hf_llama
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import HFCheckpoint
from sparse_upcycle.checkpoints.tree import flatten


def _llama(tmp_path, shard=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kw)
    return model


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_reads_single_and_sharded_llama(tmp_path, shard):
    model = _llama(tmp_path, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ckpt = HFCheckpoint(str(tmp_path))
    assert ckpt.model_family == "llama" and ckpt.config.num_key_value_heads == 2
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    want = flatten(hf_llama.from_hf(sd, ckpt.config))
    assert ckpt.keys() == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(ckpt.read(key), value)
    np.testing.assert_array_equal(  # one name checked by hand: q_proj is transposed
        ckpt.read("layers_1/attention/query/kernel"), sd["model.layers.1.self_attn.q_proj.weight"].T
    )


def test_refuses_pickle_and_broken_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="never does; convert it to safetensors"):
        HFCheckpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not supported"):
        HFCheckpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="no config.json"):
        HFCheckpoint(str(tmp_path / "nowhere"))
