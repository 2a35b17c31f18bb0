"""Tokenizers, preprocessing to megatron-core indexed datasets, and GPT datasets."""
