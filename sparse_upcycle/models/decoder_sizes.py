"""The decoder's named sizes (``decoder.config(name)``): HF field values of each model's
``config.json``, plus tiny ones for tests and CPU runs."""

from __future__ import annotations

from typing import Any

_TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
)
# Llama 3.2 1B (meta-llama/Llama-3.2-1B config.json): 1,235,814,400 parameters. Its "llama3"
# RoPE frequency scaling (for contexts beyond 8k) is not implemented: plain RoPE here.
_LLAMA3_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    dtype="bfloat16",
)
# Llama 2 7B (meta-llama/Llama-2-7b-hf config.json): 6,738,415,616 parameters.
_LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    dtype="bfloat16",
)
_MOE_8X_TOP2 = dict(num_experts=8, layers="every_other")

# Qwen2.5 0.5B / 1.5B (Qwen/Qwen2.5-0.5B and -1.5B config.json): q/k/v biases (Qwen2's
# attention), tied embeddings, RoPE theta 1e6, 151,936-token vocabulary.
_QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    attention_bias=True,
    model_type="qwen2",
    dtype="bfloat16",
)
_QWEN25_15B = {
    **_QWEN25_05B,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "llama-moe-8x-top2-tiny": {**_TINY, "moe": _MOE_8X_TOP2},
    "llama3-1b": _LLAMA3_1B,
    "llama3-1b-moe-8x-top2": {**_LLAMA3_1B, "moe": _MOE_8X_TOP2},
    "llama2-7b": _LLAMA2_7B,
    "qwen2-tiny": {**_TINY, "attention_bias": True, "model_type": "qwen2"},
    "qwen2.5-0.5b": _QWEN25_05B,
    "qwen2.5-1.5b": _QWEN25_15B,
}
