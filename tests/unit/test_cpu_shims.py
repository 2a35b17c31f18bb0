"""The CPU shims are opt-in and scoped: nothing is patched at import, everything is put back,
and the device-mapping function mode is entered only around the megatron calls that need it."""

import importlib
import pkgutil
import subprocess
import sys

import pytest
import torch
from cli_runner import ENV

import maskllm_megatron
from maskllm_megatron.errors import InputError

IMPORT_EVERYTHING = """
import importlib, pkgutil, torch
from torch.overrides import _get_current_function_mode_stack
originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream)
import maskllm_megatron
for info in pkgutil.walk_packages(maskllm_megatron.__path__, "maskllm_megatron."):
    importlib.import_module(info.name)
from megatron.core.tensor_parallel import random as mrandom
assert (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream) == originals
assert not _get_current_function_mode_stack(), _get_current_function_mode_stack()
assert not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED
print("untouched")
"""


def test_importing_every_module_installs_nothing():
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "untouched" in proc.stdout, proc.stderr[-3000:]


def test_the_shims_are_scoped_and_restored():
    from torch.overrides import _get_current_function_mode_stack

    from maskllm_megatron import cpu_shims

    originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream)
    with cpu_shims.cuda_literals():  # outside the shims (e.g. on a GPU): does nothing
        assert not _get_current_function_mode_stack()
    with cpu_shims.cpu_shims():
        assert cpu_shims.active()
        assert torch.cuda.current_device() == torch.device("cpu")
        with cpu_shims.cpu_shims():  # re-entrant
            assert cpu_shims.active()
        assert cpu_shims.active()
        assert not _get_current_function_mode_stack()  # not around everything
        with cpu_shims.cuda_literals():
            assert torch.zeros(2, device="cuda").device.type == "cpu"
            assert torch.ones(1).cuda().device.type == "cpu"
        assert not _get_current_function_mode_stack()
    assert not cpu_shims.active()
    assert (torch.cuda.current_device, torch.cuda.synchronize,
            torch.cuda.current_stream) == originals


def test_megatron_refuses_to_start_on_the_cpu_without_the_shims():
    from maskllm_megatron import distributed

    with pytest.raises(RuntimeError, match="cpu_shims"):
        distributed.init_distributed(1, 1, device="cpu")


def test_device_selection():
    from maskllm_megatron import distributed

    assert distributed.select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.select_device("auto") == torch.device("cpu")
        with pytest.raises(InputError, match="no CUDA device"):  # the user's choice
            distributed.select_device("cuda")
    with pytest.raises(ValueError, match="auto, cuda, cpu"):
        distributed.select_device("tpu")
    options = type("Flags", (), {"bf16": False, "fp16": True, "fp32": False})()
    assert distributed.params_dtype(options, torch.device("cpu")) == torch.float16
    options.fp16 = False
    assert distributed.params_dtype(options, torch.device("cpu")) == torch.float32
    assert distributed.params_dtype(options, torch.device("cuda", 0)) == torch.bfloat16


def test_every_module_imports():
    for info in pkgutil.walk_packages(maskllm_megatron.__path__, "maskllm_megatron."):
        importlib.import_module(info.name)
