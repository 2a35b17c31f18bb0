"""maskllm_megatron: learnable N:M semi-structured sparsity (MaskLLM) for megatron-core."""

__version__ = "0.1.0"
