"""Parallelism with torch.distributed: tensor parallel layers, expert parallel MoE, data-parallel attention.

NCCL on NVIDIA GPUs, RCCL on AMD (PyTorch's "nccl" backend), gloo on CPU, so every parallel path runs in tests.
"""
