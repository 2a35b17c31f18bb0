"""The C++ kernel's build: it leaves the process's floating-point environment alone, and its cache
key tells CPUs apart."""

import math
import sys

import numpy as np
import pytest
import torch

from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.sampling import cpu_kernel, sample_masked_weight

# not cpu_kernel.available(): that would load the kernel at collection, before the checks
needs_kernel = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C++ compiler")

F32_SUBNORMAL = 1e-40  # below float32's smallest normal, 2**-126 ~ 1.18e-38
F64_SUBNORMAL = 5e-324  # float64's smallest subnormal


def subnormals_survive() -> dict[str, bool]:
    """Each check is false under flush-to-zero (a result below the normal range becomes 0) or
    denormals-are-zero (a subnormal input reads as 0): the x86 MXCSR bits, arm64's FPCR.FZ."""
    tiny32, tiny64 = np.finfo(np.float32).tiny, np.finfo(np.float64).tiny
    one, four = 1.0, 4.0  # names, not literals: Python folds constant expressions at compile time
    big = torch.full((1 << 16,), F32_SUBNORMAL)  # large enough for torch's vectorised kernels
    return {
        "numpy f32 subnormal * 1 (DAZ)": np.float32(F32_SUBNORMAL) * np.float32(1) != 0,
        "numpy f32 tiny / 4 (FTZ)": tiny32 / np.float32(4) != 0,
        "numpy f64 subnormal * 1 (DAZ)": np.float64(F64_SUBNORMAL) * np.float64(1) != 0,
        "numpy f64 tiny / 4 (FTZ)": tiny64 / np.float64(4) != 0,
        "python float subnormal * 1": F64_SUBNORMAL * one != 0,
        "python float tiny / 4": sys.float_info.min / four != 0,
        "math.ldexp(1, -1070) * 1": math.ldexp(one, -1070) * one != 0,
        "torch f32 subnormal * 1": bool((torch.tensor([F32_SUBNORMAL]) * 1.0 != 0).all()),
        "torch f32 subnormal * 1, vectorised": bool((big * 1.0 != 0).all()),
        "torch f32 tiny / 4": bool((torch.tensor([tiny32]) / 4.0 != 0).all()),
        "torch f64 subnormal * 1": bool(
            (torch.tensor([F64_SUBNORMAL], dtype=torch.float64) * 1.0 != 0).all()),
    }


@needs_kernel
def test_loading_and_running_the_kernel_keeps_subnormals():
    """GCC's crtfastmath.o (linked in by -ffast-math) would set FTZ/DAZ for the whole process as
    soon as the library is loaded: SparseGPT's float64 Hessian work and test references would
    then flush subnormals. Loading, forward and backward must leave them alone."""
    before = [name for name, ok in subnormals_survive().items() if not ok]
    assert not before, f"flushed before this test ran the kernel (an earlier load?): {before}"
    assert cpu_kernel.load() is not None
    pattern = NMPattern(2, 4)
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(8, 16).to(dtype).requires_grad_()
        logits = (torch.randn(8, 4, 6) * 0.01).requires_grad_()
        main_grad = torch.zeros(logits.shape)
        out, reg = sample_masked_weight(weight, logits, pattern, tau=2.0, kappa=50.0, key=3,
                                        backend="cpu")
        (out.float().sum() + reg).backward()
        out, reg = sample_masked_weight(weight, logits, pattern, tau=2.0, kappa=50.0, key=4,
                                        backend="cpu", main_grad=main_grad)
        (out.float().sum() + reg).backward()
        assert torch.isfinite(logits.grad).all() and main_grad.abs().sum() > 0
    flushed = [name for name, ok in subnormals_survive().items() if not ok]
    assert not flushed, f"the C++ kernel changed the process's float environment: {flushed}"


X86 = "flags\t\t: fpu sse sse2 avx avx2 fma\nvmx flags\t: vnmi\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 sve\nCPU implementer\t: 0x41\n"


def kernel_path_for(monkeypatch, tmp_path, cpuinfo_text, machine="x86_64"):
    cpuinfo = tmp_path / f"cpuinfo-{abs(hash((cpuinfo_text, machine)))}"
    if cpuinfo_text is not None:
        cpuinfo.write_text(cpuinfo_text)
    monkeypatch.setattr(cpu_kernel, "CPUINFO", cpuinfo)
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: machine)
    return cpu_kernel.kernel_path("g++")


def test_cache_key_follows_the_cpu_instruction_set(monkeypatch, tmp_path):
    """A home directory shared by nodes with different CPUs: each CPU gets its own library."""
    monkeypatch.setenv("MASKLLM_CACHE", str(tmp_path / "cache"))
    x86 = kernel_path_for(monkeypatch, tmp_path, X86)
    assert x86.parent == tmp_path / "cache" / "kernels"
    # the same flag set (in another order, other lines around it): the same library
    same = "model name\t: other\nflags\t\t: fma avx2 avx sse2 sse fpu\n"
    assert kernel_path_for(monkeypatch, tmp_path, same) == x86
    # one more instruction-set flag: another library
    assert kernel_path_for(monkeypatch, tmp_path, X86.replace("fma", "fma avx512f")) != x86
    # arm64 lists its features as "Features"
    arm = kernel_path_for(monkeypatch, tmp_path, ARM, machine="aarch64")
    assert arm != x86
    assert kernel_path_for(monkeypatch, tmp_path, ARM, machine="aarch64") == arm
    assert kernel_path_for(monkeypatch, tmp_path, ARM.replace(" sve", ""), "aarch64") != arm
    # no /proc/cpuinfo: the machine and processor name, still a path of its own
    fallback = kernel_path_for(monkeypatch, tmp_path, None)
    assert fallback not in (x86, arm)
    assert cpu_kernel._cpu_signature().startswith("x86_64")


def test_signature_reads_this_cpus_flags():
    words = cpu_kernel._cpu_signature().split()
    if not cpu_kernel.CPUINFO.exists():
        pytest.skip("no /proc/cpuinfo")
    if cpu_kernel.platform.machine() == "x86_64":
        assert "sse2" in words  # every x86-64 CPU has it
    elif cpu_kernel.platform.machine() == "aarch64":
        assert "fp" in words or "asimd" in words


@pytest.mark.parametrize("machine,flags", [
    ("x86_64", ["-march=native"]), ("AMD64", ["-march=native"]), ("aarch64", ["-mcpu=native"]),
    ("arm64", ["-mcpu=native"]), ("ppc64le", ["-mcpu=native"]), ("riscv64", []),
])
def test_native_tuning_is_spelled_for_the_architecture(machine, flags):
    assert cpu_kernel.arch_flags(machine) == flags


def test_fast_math_only_at_compile_time():
    """-ffast-math on the link line is what pulls in crtfastmath.o."""
    assert "-ffast-math" in cpu_kernel.COMPILE_FLAGS
    unsafe = ("-ffast-math", "-Ofast", "-funsafe-math-optimizations")
    assert not set(unsafe) & set(cpu_kernel.LINK_FLAGS)


def test_cache_key_follows_the_compiler_version(monkeypatch, tmp_path):
    """An upgraded compiler at the same path builds its own library."""
    monkeypatch.setenv("MASKLLM_CACHE", str(tmp_path / "cache"))
    cxx = "/usr/bin/g++"
    monkeypatch.setattr(cpu_kernel, "_compiler_version", lambda _: "g++ (Debian 12.2.0-14) 12.2.0")
    old = cpu_kernel.kernel_path(cxx)
    assert cpu_kernel.kernel_path(cxx) == old
    monkeypatch.setattr(cpu_kernel, "_compiler_version", lambda _: "g++ (Debian 13.1.0-1) 13.1.0")
    assert cpu_kernel.kernel_path(cxx) != old
