"""A tiny training config for tests: ``get_config("t5" | "vit" | "decoder" | "<family>-dense")``.

MoE variants have 4 experts in every other layer (expert choice in encoders/ViT, top-2 in
decoders, whose MoE layers also have one gated shared expert); ``-dense`` variants have no
``upcycle`` block."""

from sparse_upcycle.train import default_config


def get_config(arg=None):
    family, _, dense = (arg or "t5").partition("-")
    c = default_config()
    c.model.family = family
    if family == "t5":
        c.model.encoder_moe = {"router": "expert_choice", "capacity_factor": 2.0}
        c.model.decoder_moe = {"router": "top_k", "k": 2, "capacity_factor": 1.25}
    elif family == "vit":
        c.model.moe = {"router": "expert_choice", "capacity_factor": 2.0}
    else:  # with a gated shared expert (Qwen2-MoE's layout), so meshes and FSDP cover it
        c.model.moe = {
            "router": "top_k",
            "k": 2,
            "capacity_factor": 1.25,
            "num_shared_experts": 1,
            "shared_expert_gate": True,
        }
    if not dense:
        c.upcycle = {"method": "copy", "num_experts": 4}
    c.data.batch_size = 8
    c.data.seq_len = 16
    c.data.target_len = 8
    c.total_steps = 6
    c.log_every = 1
    c.eval_every = 1000
    c.eval_steps = 1
    c.checkpoint.every = 3
    c.optimizer.learning_rate = 0.01
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.peak_flops = 1e10
    return c
