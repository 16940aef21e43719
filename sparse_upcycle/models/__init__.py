"""Models: T5 v1.1 (t5.py), ViT (vit.py), Llama-style decoder (decoder.py), with MoE layers."""
