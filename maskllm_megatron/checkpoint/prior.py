"""Priors from earlier checkpoints: bias fresh mask logits towards a stored hard mask."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from maskllm_megatron.checkpoint.integrity import verify
from maskllm_megatron.checkpoint.model import parameter_entries
from maskllm_megatron.checkpoint.safe_load import load_sharded, read_tensors_metadata
from maskllm_megatron.core.nm import apply_prior, indices_to_mask
from maskllm_megatron.errors import CheckpointError
from maskllm_megatron.model.layers import LOGITS_INIT_STD, sparse_layers


@torch.no_grad()
def apply_prior_checkpoint(model, path: str | Path, strength: float) -> None:
    """Bias the logits towards the hard masks stored in ``path``: fixed masks
    (``mask_indices``, e.g. a trimmed run or a one-shot pruner) or the argmax of another
    run's logits (the paper's downstream transfer). Works at any TP x PP layout."""
    verify(path, collective=True)
    stored = read_tensors_metadata(path)
    entries = parameter_entries(model)
    request, kinds = {}, {}
    layers = [layer for _, layer in sparse_layers(model)]
    for index, layer in enumerate(layers):  # dict keys per layer: stacked layers share a key
        entry = entries[id(layer.mask_logits)]
        indices_key = entry.key[: -len(".mask_logits")] + ".mask_indices"
        if entry.key in stored:
            request[str(index)] = dataclasses.replace(entry, data=torch.empty_like(entry.data))
            kinds[index] = "logits"
        elif indices_key in stored:
            request[str(index)] = _indices_entry(
                entry, indices_key,
                torch.empty(entry.data.shape[:-1], dtype=torch.uint8, device=entry.data.device))
            kinds[index] = "indices"
        else:
            raise CheckpointError(f"prior {path} has no mask for {entry.key}; it was written for "
                                  "another model")
    loaded = load_sharded(request, path)
    for index, layer in enumerate(layers):
        value = loaded[str(index)]
        indices = value.argmax(-1) if kinds[index] == "logits" else value.long()
        pattern = layer.mask_settings.pattern
        layer.mask_logits.copy_(apply_prior(layer.mask_logits, indices_to_mask(indices, pattern),
                                            pattern, strength, scale=LOGITS_INIT_STD))


def _indices_entry(entry, key: str, data: torch.Tensor):
    """An entry laid out like ``entry`` (a logits entry) for fixed-mask indices, which lack the
    candidate axis; that axis is never sharded, so offsets and fragmentation carry over."""
    if not isinstance(entry, ShardedTensor):  # SwiGLU factory: rebuilt from the data's shape
        return dataclasses.replace(entry, key=key, data=data)
    return dataclasses.replace(
        entry, key=key, data=data, dtype=data.dtype, local_shape=entry.local_shape[:-1],
        global_shape=entry.global_shape[:-1], global_offset=entry.global_offset[:-1],
        axis_fragmentations=(entry.axis_fragmentations[:-1]
                             if entry.axis_fragmentations is not None else None))
