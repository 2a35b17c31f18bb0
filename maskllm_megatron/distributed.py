"""Starting distributed work: the device, the process group, megatron-core parallel state, seeds.

One device per rank, chosen once (:func:`select_device`): ``cuda:LOCAL_RANK`` when CUDA is
present, else the CPU; ``--device cpu`` asks for the CPU on a GPU machine (debugging). NCCL
serves CUDA ranks and gloo CPU ranks. On the CPU megatron-core needs the shims of
:mod:`.cpu_shims`, which the entry points apply; :func:`init_distributed` refuses to start
megatron on a CPU without them rather than fail deep inside it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from maskllm_megatron import cpu_shims
from maskllm_megatron.errors import InputError

DEVICES = ("auto", "cuda", "cpu")
_DEVICE: torch.device | None = None


def select_device(requested: str | torch.device | None = "auto") -> torch.device:
    """``cuda:LOCAL_RANK`` for ``auto`` on a CUDA machine and for ``cuda``, else the CPU."""
    if isinstance(requested, torch.device):
        requested = requested.type
    requested = requested or "auto"
    if requested not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK {local_rank} has no GPU: this node has "
                           f"{torch.cuda.device_count()}; start at most that many processes")
    return torch.device("cuda", local_rank)


PARAMS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def params_dtype(options, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype from ``--bf16/--fp16/--fp32`` (attributes of ``options``),
    else bf16 on a GPU and fp32 on the CPU."""
    chosen = [name for name in PARAMS_DTYPES if getattr(options, name, False)]
    if len(chosen) > 1:
        raise InputError("give at most one of --bf16, --fp16, --fp32")
    if chosen:
        return PARAMS_DTYPES[chosen[0]]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device() -> torch.device:
    """The device this rank computes on (chosen by :func:`init_distributed`)."""
    return _DEVICE if _DEVICE is not None else select_device("auto")


# ----------------------------------------------------------------------------- start-up


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the TP x PP x DP grid."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device


def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                     seed: int = 1234, timeout_s: float = 600.0,
                     device: str | torch.device | None = "auto") -> ParallelLayout:
    """Choose this rank's device, start (once) the process group from torchrun's environment,
    then megatron's parallel state.

    Without ``RANK``/``WORLD_SIZE`` a single-process group is made, so the same entry point
    serves ``python -m`` runs, torchrun and SLURM (via torchrun).
    """
    global _DEVICE
    chosen = select_device(device)
    if chosen.type == "cpu" and not cpu_shims.active():
        raise RuntimeError("megatron-core runs on the CPU only inside "
                           "maskllm_megatron.cpu_shims.cpu_shims() (the CLI applies it)")
    if dist.is_initialized() and _DEVICE is not None and _DEVICE != chosen:
        raise RuntimeError(f"this process already computes on {_DEVICE}, not {chosen}")
    _DEVICE = chosen
    if not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        if "WORLD_SIZE" not in os.environ:  # one process: an in-memory store, no port to clash
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    return set_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size, seed)


def use_layout(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               seed: int = 1234, what: str = "this step") -> ParallelLayout:
    """Lay the running process group out as TP x PP (DP is what remains) for one library step.

    Library functions call this instead of starting processes: the entry point (the CLI, a
    user's script, torchrun) owns the process group (:func:`init_distributed`)."""
    if not dist.is_initialized():
        raise RuntimeError(f"{what} runs inside a process group: call "
                           "maskllm_megatron.distributed.init_distributed() first (the maskllm "
                           "command does)")
    return set_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size, seed)


def on_rank0(fn):
    """``fn()`` on global rank 0 only (writing files); every rank returns its result or raises
    its error, so no rank waits on a collective that rank 0 left."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            box[0] = (False, err)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def set_model_parallel(tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                       seed: int = 1234,
                       virtual_pipeline_model_parallel_size: int | None = None) -> ParallelLayout:
    """(Re)initialise megatron's parallel state for a TP x PP layout; DP is what remains.
    ``virtual_pipeline_model_parallel_size``: model chunks per pipeline rank (interleaved)."""
    world = dist.get_world_size()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise InputError(f"tensor ({tp}) x pipeline ({pp}) parallel size must divide the world "
                         f"size ({world}): start a multiple of {max(tp, 1) * max(pp, 1)} "
                         "processes (torchrun --nproc-per-node) or choose smaller sizes")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
        _destroy_subgroups()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size)
    if cpu_shims.active():
        cpu_shims.install_cpu_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return current_layout()


def _destroy_subgroups() -> None:
    """Free every process group but the world: megatron's destroy_model_parallel only drops its
    references, and each leftover gloo group keeps its own polling threads alive (hundreds after
    many re-layouts, which slows everything else on the machine)."""
    world = dist.group.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world and group is not None:
            dist.destroy_process_group(group)


def current_layout() -> ParallelLayout:
    return ParallelLayout(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device(),
    )


def shutdown() -> None:
    global _DEVICE
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _DEVICE = None
