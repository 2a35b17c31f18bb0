"""Starting distributed work: process group, megatron-core parallel state, seeds, CPU shims.

Everything megatron-core needs to run without a GPU lives here, and is applied only when
``torch.cuda.is_available()`` is False, so GPU behaviour is never changed. megatron-core
(0.16-0.19) hard-codes CUDA in four places; the shims are:

1. the model-parallel RNG tracker forks the CUDA generator -> a tracker that forks the CPU one;
2. ``torch.cuda.current_device()`` (RoPE, attention buffers, gathers) -> the CPU device;
3. ``torch.cuda.synchronize`` / ``current_stream`` (p2p, checkpoint writer, DDP) -> no-ops;
4. literal ``device="cuda"`` and ``.cuda()`` (pipeline schedules, default causal masks, tied
   embeddings) -> a process-wide ``TorchFunctionMode`` that maps them to the CPU.

Two limits remain on CPU and are handled by callers: gradient clipping and the distributed
optimizer of megatron-core type-check ``torch.cuda.FloatTensor`` (our trainer clips the logits
itself), and the local spec's torch LayerNorm cannot run sequence parallel.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU_MODE: TorchFunctionMode | None = None


# ----------------------------------------------------------------------------- CPU shims


def _cpu_device(dev):
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    if isinstance(dev, int) and not isinstance(dev, bool):  # a CUDA ordinal
        return "cpu"
    return dev


class CudaToCpuMode(TorchFunctionMode):
    """Maps ``device="cuda"``, ``.cuda()`` and ``.to("cuda")`` to the CPU (shim 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            args = (args[0], _cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def _install_cpu_rng_tracker() -> None:
    """Shim 1: megatron's tracker API, backed by the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def install_cpu_shims() -> bool:
    """Make megatron-core run on a CPU-only machine; idempotent; a no-op when CUDA exists.

    Returns True when the shims are active. The function mode is entered once for the process
    (and stays entered), so megatron's schedules, masks and tied embeddings work unchanged.
    """
    global _CPU_MODE
    if torch.cuda.is_available():
        return False
    _install_cpu_rng_tracker()
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    if _CPU_MODE is None:
        _CPU_MODE = CudaToCpuMode()
        _CPU_MODE.__enter__()
    return True


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                     seed: int = 1234, timeout_s: float = 600.0) -> ParallelLayout:
    """Start (once) the process group from torchrun's environment, then megatron's parallel state.

    NCCL on GPU, gloo on CPU. Without ``RANK``/``WORLD_SIZE`` a single-process group is made, so
    the same entry point serves ``python -m`` runs, torchrun and SLURM (via torchrun).
    """
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if cuda else "gloo"
        if "WORLD_SIZE" not in os.environ:  # one process: an in-memory store, no port to clash
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    install_cpu_shims()
    return set_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size, seed)


def set_model_parallel(tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                       seed: int = 1234) -> ParallelLayout:
    """(Re)initialise megatron's parallel state for a TP x PP layout; DP is what remains."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(f"tensor ({tp}) x pipeline ({pp}) parallel size must divide the world "
                         f"size ({world})")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
        _destroy_subgroups()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if not torch.cuda.is_available():
        from megatron.core.tensor_parallel import random as mrandom

        mrandom._CUDA_RNG_STATE_TRACKER = None  # fresh tracker: seeds may repeat across layouts
        _install_cpu_rng_tracker()
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
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
