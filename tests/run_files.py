"""Reading what runs leave on disk, for tests in every tier: train logs and whole tensors of
dist checkpoints."""

import json
from pathlib import Path


def train_log(save) -> list[dict]:
    path = Path(save) / "train_log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def plain_tensors(path) -> dict:
    """Every tensor of a dist checkpoint, whole."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{Path(path).parent}/.pg", rank=0,
                                world_size=1)
    return dist_checkpointing.load_plain_tensors(str(path))


def final_logits(save, iteration):
    """The mask logits of a run's iter_N checkpoint, whole (the test model has 4 layers' worth)."""
    tensors = plain_tensors(Path(save) / f"iter_{iteration:07d}" / "model")
    logits = {k: v for k, v in tensors.items() if k.endswith("mask_logits")}
    assert len(logits) == 4
    return logits
