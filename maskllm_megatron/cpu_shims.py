"""What megatron-core needs to run on a CPU: opt-in, scoped, never used with a GPU.

megatron-core (0.16-0.19) assumes CUDA in four places. The entry points (the CLI, the test
harness, the benchmarks) wrap a CPU run in :func:`cpu_shims`; library code never installs
anything. Inside it:

1. the model-parallel RNG tracker forks the CPU generator instead of the CUDA one;
2. ``torch.cuda.current_device()`` (buffers, RoPE, gathers) names the CPU;
3. ``torch.cuda.synchronize`` / ``current_stream`` (p2p, checkpoint writer, DDP) are no-ops;
4. literal ``device="cuda"`` and ``.cuda()`` (pipeline schedules, the default causal mask,
   tied embeddings, gradient clipping) go to the CPU, but only inside :func:`cuda_literals`,
   which library code opens around the megatron calls that contain them; every other tensor op
   runs without a ``TorchFunctionMode`` in the way.

Everything is restored when :func:`cpu_shims` exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False


def active() -> bool:
    """True inside :func:`cpu_shims` (megatron runs on the CPU)."""
    return _ACTIVE


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


@contextlib.contextmanager
def cuda_literals() -> Iterator[None]:
    """Around a megatron call that writes ``device="cuda"``: maps it to the CPU inside
    :func:`cpu_shims`, and does nothing otherwise (on a GPU the call is left alone)."""
    if not _ACTIVE:
        yield
        return
    with CudaToCpuMode():
        yield


class _NullStream:
    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def install_cpu_rng_tracker() -> None:
    """Shim 1: a fresh megatron RNG tracker backed by the CPU generator (a new one per parallel
    layout, since seeds may repeat across layouts)."""
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

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


@contextlib.contextmanager
def cpu_shims() -> Iterator[None]:
    """Run megatron-core on the CPU inside this block (shims 1-3; shim 4 through
    :func:`cuda_literals`). Re-entrant; everything is put back on exit."""
    global _ACTIVE
    if _ACTIVE:
        yield
        return
    from megatron.core.tensor_parallel import random as mrandom

    saved = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream,
             mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    install_cpu_rng_tracker()
    _ACTIVE = True
    try:
        yield
    finally:
        _ACTIVE = False
        (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream,
         mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED) = saved
