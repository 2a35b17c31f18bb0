"""Optimizer moments in a checkpoint, laid out like their parameters (megatron's "fully
reshardable" format): written at one TP x PP x DP layout, they load at any other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from maskllm_megatron.checkpoint.integrity import verify
from maskllm_megatron.checkpoint.model import parameter_entries, write_sharded
from maskllm_megatron.checkpoint.safe_load import load_sharded

MOMENTS = ("exp_avg", "exp_avg_sq")


def moment_entries(entries: dict[int, object], params: list[torch.nn.Parameter],
                   moments: dict[int, dict[str, torch.Tensor]]) -> dict[str, object]:
    """Sharded-checkpoint entries for parameter-shaped moments, laid out like their parameters
    (``entries``: id(param) -> the parameter's ShardedTensor or factory), so a checkpoint
    written at one TP x PP x DP layout loads at any other. Dict keys only tell the entries
    apart; the checkpoint matches them by the parameters' keys and offsets."""
    sharded = {}
    for index, param in enumerate(params):
        entry = entries[id(param)]
        is_factory = not hasattr(entry, "dtype")  # megatron's SwiGLU factory has none
        for name, tensor in moments[id(param)].items():
            extra = {} if is_factory else {"dtype": tensor.dtype}
            sharded[f"{name}:{index}"] = dataclasses.replace(
                entry, key=f"optimizer.{name}.{entry.key}", data=tensor, **extra)
    return sharded


def save_moments(model, optimizer, path: str | Path) -> None:
    """Gather this optimizer's moments over data parallel and write them under ``path``."""
    moments = optimizer.gather_moments()
    write_sharded(moment_entries(parameter_entries(model), optimizer.params(), moments), path)


def load_moments(model, optimizer, path: str | Path, step_count: int) -> None:
    """Read the moments under ``path`` into ``optimizer``'s data-parallel slices."""
    verify(path, collective=True)
    params = optimizer.params()
    empty = {id(p): {name: torch.empty(p.shape, dtype=getattr(optimizer.format, f"{name}_dtype"),
                                       device=p.device)
                     for name in MOMENTS} for p in params}
    loaded = load_sharded(moment_entries(parameter_entries(model), params, empty), path)
    optimizer.load_moments({id(p): {name: loaded[f"{name}:{index}"] for name in MOMENTS}
                            for index, p in enumerate(params)}, step_count)
