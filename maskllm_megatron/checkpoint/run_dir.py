"""A training run's directory: ``iter_N`` checkpoints written atomically, the ``latest``
pointer written last, and the run state (``train_state.json``) beside the tensors.

::

    SAVE/latest                      -> iter_0000100 (written after the checkpoint is complete)
    SAVE/iter_0000100/model/         model tensors (dist_checkpointing) + maskllm.json
    SAVE/iter_0000100/optimizer/     Adam moments laid out like their parameters
    SAVE/iter_0000100/train_state.json
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from maskllm_megatron.checkpoint.integrity import seal, verify
from maskllm_megatron.errors import TrainingError
from maskllm_megatron.model.config import MODEL_FILES

TRAIN_STATE = "train_state.json"


def write_checkpoint(root: str | Path, iteration: int, write_tensors, train_state: dict,
                     keep: int = 2) -> Path:
    """Write ``root/iter_N`` atomically on every rank: ``write_tensors(tmp)`` fills a temporary
    directory (collectively), rank 0 adds ``train_state``, renames it into place, then moves the
    ``latest`` pointer and keeps the newest ``keep`` checkpoints."""
    root = Path(root)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier left this behind
        for part in ("model", "optimizer"):
            (tmp / part).mkdir(parents=True)
    dist.barrier()
    write_tensors(tmp)
    if rank0:
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state))
        seal(tmp)  # train_state.json (model/ and optimizer/ have their own checksums)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")  # written last: the checkpoint is complete
        seal(root, names=("latest", *MODEL_FILES))  # not the logs, which keep growing
        for old in sorted(root.glob("iter_???????"))[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_train_state(checkpoint: str | Path) -> dict:
    verify(checkpoint)
    return json.loads((Path(checkpoint) / TRAIN_STATE).read_text())


def latest_checkpoint(root: str | Path | None) -> Path | None:
    if root is None:
        return None
    pointer = Path(root) / "latest"
    verify(root, names=("latest",))
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "train_state.json").exists():
        raise TrainingError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def model_dir(path: str | Path) -> Path:
    """The model checkpoint inside ``path``: a run directory (its latest), an ``iter_N``
    directory, or a model checkpoint itself."""
    path = Path(path)
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest / "model"
    if (path / "model" / "metadata.json").exists():
        return path / "model"
    return path
