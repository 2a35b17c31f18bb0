"""Ahead-of-time compilation of the sampler's Triton kernels: registers, spills, occupancy.

Triton compiles a kernel the first time a configuration runs, on every rank, mid-training; how
many registers it then needs decides its occupancy, and spills cost bandwidth. This module
checks both without a GPU:

* :func:`calls` lists every configuration the launcher (``triton_kernel.forward_launch`` /
  ``backward_launch``) accepts: pattern, weight dtype, soft/hard, weight gradient on/off,
  gradient returned or added into an fp32/bf16/fp16 ``main_grad``;
* :func:`variant_key` binds a call's real arguments with Triton's own binder, as
  ``JITFunction.run`` does, giving the kernel-cache key a launch would compile under. Calls
  that share a key share one compiled kernel (:func:`variants`);
* :func:`compile_all` compiles each variant for a GPU architecture with ``triton.compile``
  (the bundled ``ptxas``, no driver) in worker processes outside the interpreter, and reads
  registers and stack bytes (where spills go) from the cubin with the bundled ``cuobjdump``,
  shared memory from Triton's metadata; :func:`occupancy` turns them into resident warps.

Triton is optional: without it :data:`AVAILABLE` is false and nothing here can run.
``python -m maskllm_megatron.sampling.triton_aot`` is the worker (JSON lines in and out).
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.sampling import SampleSpec
from maskllm_megatron.sampling import triton_kernel as tk
from maskllm_megatron.sampling.noise import ShardGroups

AVAILABLE = tk.triton is not None
ARCHS = (80, 90)
PATTERNS = ("2:4", "1:4", "2:8", "4:8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAIN_GRADS = (None, "fp32", "bf16", "fp16")  # None: the logits gradient is returned (fp32)

# Per-SM limits of the occupancy calculation (CUDA occupancy calculator, compute 8.0 / 9.0).
REGISTERS_PER_SM = 65536
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_BLOCK = 1024


@dataclass(frozen=True)
class Call:
    """One way the launcher can be called (``main_grad``: dtype added into, None: returned)."""

    kernel: str  # "forward" or "backward"
    pattern: str
    dtype: str
    hard: bool
    wgrad: bool = False
    main_grad: str | None = None

    @property
    def mode(self) -> str:
        mode = "hard" if self.hard else "soft"
        if self.kernel == "backward":
            mode += ", dW" if self.wgrad else ""
            mode += f", += {self.main_grad}" if self.main_grad else ", returned"
        return mode


def calls() -> list[Call]:
    """Every configuration the launcher can be called with."""
    out = []
    for pattern in PATTERNS:
        for dtype in DTYPES:
            for hard in (False, True):
                out.append(Call("forward", pattern, dtype, hard))
                out.extend(Call("backward", pattern, dtype, hard, wgrad, main_grad)
                           for wgrad in (False, True) for main_grad in MAIN_GRADS)
    return out


def launch(call: Call, *, key: int = 0, rows: int = 1, groups: int = 1,
           shard: ShardGroups | None = None, offset: int = 0, kappa: float = 1.0,
           tau: float = 1.0):
    """``(kernel, args, meta)`` the launcher builds for ``call`` on small CPU tensors, with the
    GPU launch configuration. ``offset`` elements in front make every input a misaligned view."""
    pattern = NMPattern(*map(int, call.pattern.split(":")))
    dtype = DTYPES[call.dtype]
    c = pattern.num_candidates

    def make(shape, dt):
        flat = torch.zeros(offset + math.prod(shape), dtype=dt)
        return flat[offset:].view(shape)

    weight = make((rows, groups * pattern.m), dtype)
    logits = make((rows, groups, c), torch.float32)
    shard = (shard or ShardGroups()).resolve(rows, groups)
    spec = SampleSpec(pattern, tau, kappa, key, shard, call.hard)
    if call.kernel == "forward":
        _, args, _, _, _ = tk.forward_launch(weight, logits, spec)
        kernel = tk.forward_kernel
    else:
        into = None if call.main_grad is None else make((rows, groups, c), DTYPES[call.main_grad])
        _, args, *_ = tk.backward_launch(make(weight.shape, dtype), make((), torch.float32),
                                         weight, logits, spec, call.wgrad, into)
        kernel = tk.backward_kernel
    return kernel, args, tk.launch_config(pattern, interpret=False)


@functools.cache
def jit_function(kernel):
    """The ``JITFunction`` of a kernel (rebuilt from its source under the interpreter)."""
    from triton.runtime.jit import JITFunction  # optional: triton

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)


def _bind(fn, backend, args, meta):
    """Triton's binder on ``args``, with the options ``JITFunction.run`` adds (triton 3.9)."""
    from triton import knobs  # optional: triton
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(meta, debug=meta.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kwargs, bound, specialization, options


def variant_key(kernel, args, meta, arch: int = 90) -> str:
    """The kernel-cache key ``JITFunction.run`` computes for these arguments: one compiled
    variant per distinct key."""
    from triton.backends.compiler import GPUTarget  # optional: triton
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key

    fn = jit_function(kernel)
    _, _, specialization, options = _bind(fn, make_backend(GPUTarget("cuda", arch, 32)), args,
                                          meta)
    return compute_cache_key({}, specialization, options)


def variants() -> dict[tuple[str, str], list[Call]]:
    """Calls grouped by the compiled variant they launch: ``{(kernel, key): [calls]}``."""
    groups: dict[tuple[str, str], list[Call]] = {}
    for call in calls():
        kernel, args, meta = launch(call)
        groups.setdefault((call.kernel, variant_key(kernel, args, meta)), []).append(call)
    return groups


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> float:
    """Resident warps per SM / 64 for a kernel using ``registers`` per thread and ``shared``
    bytes per block, from the register file, block/warp limits and shared memory."""
    per_warp = max(1, math.ceil(registers * 32 / REGISTER_GRANULE)) * REGISTER_GRANULE
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps,
                 REGISTERS_PER_SM // per_warp // num_warps,
                 SHARED_PER_SM[arch] // (shared + SHARED_RESERVED_PER_BLOCK))
    return blocks * num_warps / MAX_WARPS_PER_SM


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack / local bytes per thread of a cubin (``cuobjdump``).
    Spilled registers live in the stack frame: no stack, no spills."""
    from triton import knobs  # optional: triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)],
                              check=True, capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return dict(registers=int(usage[1]), stack=int(usage[2]), local=int(usage[3]))


def compile_variant(call: Call, arch: int) -> dict:
    """Compile the variant ``call`` launches for ``sm_<arch>``, as ``JITFunction._do_compile``
    would on that GPU; returns its resource usage and occupancy."""
    import triton  # optional: triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel, args, meta = launch(call)
    fn = jit_function(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs, bound, specialization, options = _bind(fn, backend, args, meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    usage = _resource_usage(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    warps = compiled.metadata.num_warps
    return dict(usage, arch=arch, block=meta["BLOCK"], num_warps=warps, shared=shared,
                spills=usage["stack"] + usage["local"],
                occupancy=occupancy(usage["registers"], shared, warps, arch))


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def compile_all(archs=ARCHS, jobs: int | None = None) -> list[dict]:
    """Compile every variant the launcher's configurations launch, for every arch.

    One record per (variant, arch): the resource usage, occupancy, ``kernel``, ``pattern``,
    weight ``dtype``, and the modes the variant serves (``mode`` in short, ``calls``).
    Compiles run in ``jobs`` worker processes (default: the CPU count) outside the
    interpreter; Triton's on-disk cache makes repeated runs cheap."""
    if not AVAILABLE:
        raise RuntimeError("triton is not installed")
    groups = list(variants().items())
    tasks = queue.Queue()
    for index, (_, members) in enumerate(groups):
        for arch in archs:
            tasks.put((index, arch, members[0]))
    results: dict[tuple[int, int], dict] = {}
    errors: list[str] = []

    def serve():
        with tempfile.TemporaryFile("w+") as log:
            worker = subprocess.Popen([sys.executable, "-m", __name__],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                      text=True, env=_worker_env())
            while True:
                try:
                    index, arch, call = tasks.get_nowait()
                except queue.Empty:
                    break
                worker.stdin.write(json.dumps(dict(call=asdict(call), arch=arch)) + "\n")
                worker.stdin.flush()
                line = worker.stdout.readline()
                if not line:
                    log.seek(0)
                    errors.append(f"compiling {call} for sm_{arch} failed:\n{log.read()}")
                    break
                results[index, arch] = json.loads(line)
            worker.stdin.close()
            worker.wait()

    threads = [threading.Thread(target=serve) for _ in range(jobs or os.cpu_count() or 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors or len(results) != len(groups) * len(archs):
        raise RuntimeError("\n".join(errors) or "a compile worker stopped early")
    records = []
    for index, ((kernel, _), members) in enumerate(groups):
        for arch in archs:
            first = members[0]
            records.append(dict(results[index, arch], kernel=kernel, pattern=first.pattern,
                                dtype=first.dtype, mode=summary(members),
                                calls=[m.mode for m in members]))
    return records


def summary(members: list[Call]) -> str:
    """The modes a variant serves, e.g. ``soft/hard, dW on/off, returned/+= fp32``."""
    parts = ["/".join(sorted({"hard" if m.hard else "soft" for m in members}, reverse=True))]
    if members[0].kernel == "backward":
        parts.append("dW " + "/".join(sorted({"on" if m.wgrad else "off" for m in members},
                                            reverse=True)))
        parts.append("/".join(sorted({f"+= {m.main_grad}" if m.main_grad else "returned"
                                      for m in members}, reverse=True)))
    return ", ".join(parts)


def _worker() -> int:
    """Compile the tasks read from stdin, one JSON line each, answering one line each."""
    for line in sys.stdin:
        task = json.loads(line)
        record = compile_variant(Call(**task["call"]), task["arch"])
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
