"""Upcycling: dense checkpoints to MoE (methods.py: copy, virtual_group, drop)."""
