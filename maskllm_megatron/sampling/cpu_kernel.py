"""Builds and calls the fused C++ CPU kernel (``cpu_kernel.cpp``) through ctypes.

Why not a torch extension: ``torch.utils.cpp_extension`` spends ~30 s compiling torch headers per
machine and ``torch.compile`` did not finish within minutes on this integer-heavy function; a
plain C++ file builds in about a second. The library is cached under
``$MASKLLM_CACHE`` (default ``~/.cache/maskllm``) keyed by source, flags, compiler and CPU flags,
and written atomically so concurrent ranks never load a half-written file. Without a compiler
the dispatcher falls back to the PyTorch path, which computes the same function.
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
# -ffast-math lets GCC call glibc's vector logf/expf; inputs are finite by construction
# (uniforms lie strictly inside (0, 1)), so no inf/NaN handling is lost inside the kernel.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_i64, _u64, _f32, _int, _ptr = (ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_int,
                                ctypes.c_void_p)


def cache_dir() -> Path:
    return Path(os.environ.get("MASKLLM_CACHE", Path.home() / ".cache" / "maskllm"))


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; ``None`` when it cannot be built."""
    cxx = _compiler()
    if cxx is None or os.environ.get("MASKLLM_DISABLE_CPU_KERNEL") == "1":
        return None
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cxx.encode(),
                 _cpu_signature().encode()):
        digest.update(part)
    target = cache_dir() / "kernels" / f"gumbel_mask_{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                warnings.warn(f"maskllm: building the CPU kernel failed, using the PyTorch path "
                              f"instead:\n{proc.stderr[-2000:]}", RuntimeWarning, stacklevel=2)
                return None
            os.replace(tmp, target)  # atomic: other ranks see the whole file or nothing
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    common = [_i64, _i64, _int, _int, _int, _i64, _i64, _i64, _u64, _f32, _f32, _int]
    lib.maskllm_gumbel_forward.argtypes = [_ptr, _int, _ptr, _ptr, *common, _ptr, _ptr, _int]
    lib.maskllm_gumbel_backward.argtypes = [_ptr, _ptr, _int, _ptr, _ptr, *common, _f32, _ptr,
                                            _int, _int, _ptr, _int]
    lib.maskllm_gumbel_forward.restype = _int
    lib.maskllm_gumbel_backward.restype = _int
    lib.maskllm_limits.restype = _int
    return lib


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
