"""GPT training data through megatron-core's dataset builder (blends, splits, seeded order).

``batch_for`` maps (iteration, micro-batch, data-parallel rank) to sample indices directly, so
the data position of a run is just its iteration: a resumed run reads exactly the samples an
uninterrupted one would have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from maskllm_megatron.errors import InputError


def parse_blend(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's ``--data-path``: ``PREFIX`` ... or ``WEIGHT PREFIX WEIGHT PREFIX`` ..."""
    if not data_path:
        raise InputError("no --data-path given; give indexed dataset prefixes written by "
                         "`maskllm preprocess`")
    try:
        weights = [float(x) for x in data_path[0::2]]
    except ValueError:
        return list(data_path), None
    if len(data_path) % 2:
        raise InputError(f"--data-path alternates weights and prefixes, got {data_path}")
    return list(data_path[1::2]), weights


def build_gpt_datasets(data_path: list[str], tokenizer, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], split: str = "98,2,0",
                       cache_dir: str | None = None):
    """(train, valid, test) megatron ``GPTDataset``s (or blends of them); None for empty splits."""
    prefixes, weights = parse_blend(data_path)
    for prefix in prefixes:
        if not (os.path.exists(f"{prefix}.bin") and os.path.exists(f"{prefix}.idx")):
            raise FileNotFoundError(f"dataset {prefix}.bin/.idx not found (run maskllm "
                                    "preprocess first)")
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=cache_dir, mmap_bin_files=True)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True,
                                         config).build()


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_step:
            raise InputError(f"--global-batch-size ({self.global_batch_size}) must be a multiple "
                             f"of micro-batch size x data-parallel size ({per_step})")

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def indices(self, iteration: int, microbatch: int, dp_rank: int) -> range:
        start = (iteration * self.global_batch_size
                 + (microbatch * self.data_parallel_size + dp_rank) * self.micro_batch_size)
        return range(start, start + self.micro_batch_size)


def batch_for(dataset, layout: BatchLayout, iteration: int, microbatch: int,
              dp_rank: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Stack the micro-batch's samples: tokens, labels, loss_mask, position_ids [b, s], on
    ``device`` (through pinned memory, without blocking, for a GPU)."""
    samples = [dataset[i % len(dataset)] for i in layout.indices(iteration, microbatch, dp_rank)]
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}
    return to_device(batch, device)


def to_device(batch: dict[str, torch.Tensor], device: torch.device | None
              ) -> dict[str, torch.Tensor]:
    """Host tensors onto ``device``: pinned and copied asynchronously for CUDA."""
    if device is None or device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
