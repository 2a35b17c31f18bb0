"""Builds and calls the fused C++ CPU kernel (``cpu_kernel.cpp``) through ctypes.

Why not a torch extension: ``torch.utils.cpp_extension`` spends ~30 s compiling torch headers per
machine and ``torch.compile`` did not finish within minutes on this integer-heavy function; a
plain C++ file builds in about a second. The library is cached under ``$MASKLLM_CACHE``
(default ``~/.cache/maskllm``) keyed by source, flags, compiler (path and version) and the CPU's
instruction-set flags (``/proc/cpuinfo``: ``flags`` on x86-64, ``Features`` on arm64), so a home
directory shared by nodes with different CPUs never loads a kernel built for another CPU; it is
written atomically so concurrent ranks never load a half-written file. Without a compiler the
dispatcher falls back to the PyTorch path, which computes the same function.

Build: compiled with ``-ffast-math`` (with ``-march=native`` on x86-64, ``-mcpu=native`` on arm64
and POWER) because only then does glibc declare its vector ``logf``/``expf`` (libmvec) that the
soft-index loops need to vectorise; GCC defines ``__FAST_MATH__``, which ``<bits/math-vector.h>``
tests, only when every fast-math flag is on, so no smaller set of flags does it. It is *linked*
without it: ``-ffast-math`` (or ``-funsafe-math-optimizations``, ``-Ofast``) on the link line
makes GCC and clang add ``crtfastmath.o``, whose start-up code sets flush-to-zero and
denormals-are-zero (x86 MXCSR; FPCR.FZ on arm64) for the whole process the moment the library
is loaded. Linked separately, the kernel leaves the floating-point environment alone.

Numerics contract (the tests check it):

* inputs are read exactly (bf16/fp16 weights widen to fp32); every quantity, noise, scores
  ``(kappa * logits + g) / tau``, softmax, mask, ``W * mask`` and the gradients, is computed in
  fp32 (``logf``/``expf`` from glibc's vector library, within a few fp32 ulps), the regulariser
  is accumulated in float64 per tile;
* each output is rounded once, to nearest even, from its fp32 value to the output dtype
  (``W * mask``, ``d W``); the logits gradient is written, or added to the gradient buffer with
  one rounding exactly like ``buffer.add_(fp32 gradient)``;
* hence bf16/fp16 outputs lie within one ulp of the float64 reference (the fp32 error is far
  below half an ulp of the output, so the result is the correctly rounded value or, near a
  rounding boundary, its neighbour), and fp32 outputs within one ulp plus the fp32 arithmetic's
  own error. Which of the two neighbours comes out can differ between CPUs (vector ``expf``
  implementations, FMA contraction), so results are bit-exact only for the same build on the
  same CPU: there they are independent of the thread count and of the tensor-parallel layout
  (every group takes the same vector code path wherever it sits). The noise bits are the
  counter-based stream of :mod:`.noise` on every CPU; only the fp32 Gumbel values computed from
  them may differ in the last place.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from maskllm_megatron.core.nm import NMPattern

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
CPUINFO = Path("/proc/cpuinfo")
# Compile: -ffast-math so that GCC calls glibc's vector logf/expf; inputs are finite by
# construction (uniforms lie strictly inside (0, 1)), so no inf/NaN handling is lost inside the
# kernel. Link: without it, or crtfastmath.o would set FTZ/DAZ for the whole process (docstring).
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
LINK_FLAGS = ["-shared", "-fopenmp"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_i64, _u64, _f32, _int, _ptr = (ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_int,
                                ctypes.c_void_p)


def cache_dir() -> Path:
    return Path(os.environ.get("MASKLLM_CACHE", Path.home() / ".cache" / "maskllm"))


def arch_flags(machine: str | None = None) -> list[str]:
    """Tune for this CPU: GCC spells it ``-march=native`` on x86 and ``-mcpu=native`` on arm64
    and POWER; elsewhere no flag (a portable build)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return ["-march=native"]
    if machine.startswith(("aarch64", "arm", "ppc", "powerpc")):
        return ["-mcpu=native"]
    return []


def _cpu_signature() -> str:
    """The machine and its instruction-set flags (x86 ``flags``, arm64 ``Features``), sorted: what
    ``-march=native``/``-mcpu=native`` compiles for. Without ``/proc/cpuinfo``: what Python
    knows of the processor."""
    machine = platform.machine()
    try:
        for line in CPUINFO.read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() in ("flags", "features"):
                return f"{machine}: {' '.join(sorted(set(value.split())))}"
    except OSError:
        pass
    return f"{machine}: {platform.processor()}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def _compiler_version(cxx: str) -> str:
    """The compiler's own banner (``g++ --version``): an upgraded compiler at the same path
    builds afresh."""
    try:
        proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.partition("\n")[0]


def kernel_path(cxx: str) -> Path:
    """Where the library built by ``cxx`` for this CPU is cached."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(COMPILE_FLAGS + arch_flags()).encode(),
                 " ".join(LINK_FLAGS).encode(), cxx.encode(), _compiler_version(cxx).encode(),
                 _cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / "kernels" / f"gumbel_mask_{digest.hexdigest()[:16]}.so"


def _build(cxx: str, target: Path) -> bool:
    """Compiles, then links without the fast-math flags (no crtfastmath.o), into a temporary
    file renamed over ``target``: other ranks see the whole file or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
        for cmd in ([cxx, *COMPILE_FLAGS, *arch_flags(), "-c", str(SOURCE), "-o", str(obj)],
                    [cxx, *LINK_FLAGS, str(obj), "-o", str(lib)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                warnings.warn(f"maskllm: building the CPU kernel failed, using the PyTorch path "
                              f"instead:\n{' '.join(cmd)}\n{proc.stderr[-2000:]}",
                              RuntimeWarning, stacklevel=3)
                return False
        os.replace(lib, target)
    return True


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; ``None`` when it cannot be built."""
    cxx = _compiler()
    if cxx is None or os.environ.get("MASKLLM_DISABLE_CPU_KERNEL") == "1":
        return None
    target = kernel_path(cxx)
    if not target.exists() and not _build(cxx, target):
        return None
    lib = ctypes.CDLL(str(target))
    common = [_i64, _i64, _int, _int, _int, _i64, _i64, _i64, _u64, _f32, _f32, _int]
    lib.maskllm_gumbel_forward.argtypes = [_ptr, _int, _ptr, _ptr, *common, _ptr, _ptr, _int]
    lib.maskllm_gumbel_backward.argtypes = [_ptr, _ptr, _int, _ptr, _ptr, *common, _f32, _ptr,
                                            _int, _int, _ptr, _int]
    lib.maskllm_gumbel_forward.restype = _int
    lib.maskllm_gumbel_backward.restype = _int
    lib.maskllm_limits.restype = _int
    lib.maskllm_philox.argtypes = [ctypes.c_uint32, ctypes.c_uint32, _ptr]
    lib.maskllm_philox.restype = None
    return lib


def philox4x32(key: int, counter: tuple[int, int, int, int]) -> tuple[int, ...]:
    """One Philox4x32-10 block from the compiled kernel's own generator (known-answer tests)."""
    words = (ctypes.c_uint32 * 4)(*counter)
    load().maskllm_philox(key & 0xFFFFFFFF, key >> 32, words)
    return tuple(words)


def available() -> bool:
    return load() is not None


def supports(weight: torch.Tensor, logits: torch.Tensor, pattern: NMPattern) -> bool:
    lib = load()
    return (
        lib is not None
        and weight.device.type == "cpu"
        and weight.dtype in DTYPE_CODES
        and logits.dtype == torch.float32
        and pattern.num_candidates <= lib.maskllm_limits(0)
        and pattern.m <= lib.maskllm_limits(1)
    )


def _common_args(weight, logits, spec):
    p = spec.pattern
    rows, gpr = weight.shape[0], weight.shape[1] // p.m
    positions = p.candidate_positions()
    args = [positions.data_ptr(), rows, gpr, p.num_candidates, p.n, p.m,
            spec.shard.row_offset, spec.shard.group_col_offset, spec.shard.groups_per_row,
            spec.key, float(spec.kappa), float(spec.tau), int(spec.hard)]
    return args, positions  # keep positions alive during the call


def forward(weight: torch.Tensor, logits: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    weight, logits = weight.contiguous(), logits.contiguous()
    out = torch.empty_like(weight)
    tile = load().maskllm_limits(2)
    reg_tiles = torch.empty(-(-(weight.numel() // spec.pattern.m) // tile), dtype=torch.float64)
    args, _keep = _common_args(weight, logits, spec)
    status = load().maskllm_gumbel_forward(
        weight.data_ptr(), DTYPE_CODES[weight.dtype], logits.data_ptr(), *args,
        out.data_ptr(), reg_tiles.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"maskllm CPU kernel rejected the call (status {status})")
    return out, reg_tiles.sum().to(torch.float32)


def backward(grad_out, grad_reg, weight, logits, spec, need_weight_grad: bool, into=None):
    """``(d logits, d weight or None)``; with ``into`` the logits gradient is added to that
    buffer (fp32, bf16 or fp16, contiguous) in the same pass and ``None`` is returned for it."""
    weight, logits = weight.contiguous(), logits.contiguous()
    grad_out = grad_out.to(weight.dtype).contiguous()
    grad_reg = 0.0 if grad_reg is None else float(grad_reg)  # a CPU scalar: no device sync
    target = torch.empty_like(logits) if into is None else into
    if target.dtype not in DTYPE_CODES or not target.is_contiguous():
        raise ValueError(f"the C++ sampler accumulates into contiguous fp32/bf16/fp16 buffers, "
                         f"got {target.dtype} (contiguous={target.is_contiguous()})")
    grad_weight = torch.empty_like(weight) if need_weight_grad else None
    args, _keep = _common_args(weight, logits, spec)
    status = load().maskllm_gumbel_backward(
        grad_out.data_ptr(), weight.data_ptr(), DTYPE_CODES[weight.dtype], logits.data_ptr(),
        *args, float(grad_reg), target.data_ptr(), DTYPE_CODES[target.dtype],
        int(into is not None), grad_weight.data_ptr() if grad_weight is not None else None,
        torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"maskllm CPU kernel rejected the call (status {status})")
    return (None if into is not None else target), grad_weight
