"""``maskllm info``: versions, the device a run would use, and this machine's fast paths."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter

# megatron's import-time warnings are silenced in every command; this is where they are said.
FALLBACK = ("megatron falls back to torch implementations of what Transformer Engine / Apex "
            "would provide (its import warnings are not repeated by other commands)")


def add_parsers(sub: typing.Any) -> None:
    info = sub.add_parser("info", help="versions and available sampler backends",
                          formatter_class=HelpFormatter)
    info.set_defaults(func=run)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(name)
    except PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import platform

    import torch

    from maskllm_megatron import __version__
    from maskllm_megatron.model.spec import apex_layer_norm, transformer_engine_modules
    from maskllm_megatron.sampling import cpu_kernel, triton_kernel

    cuda = torch.cuda.is_available()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    te = transformer_engine_modules() is not None
    apex = apex_layer_norm() is not None
    rows = [
        ("maskllm_megatron", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("megatron-core", _version("megatron-core")),
        ("device", f"cuda ({torch.cuda.device_count()} x {gpus}), NCCL" if cuda else
         "cpu (no CUDA), gloo; megatron runs through the CPU shims"),
        ("transformer engine", (f"yes ({_version('transformer-engine')}): norms and fused "
                                "attention on GPU (--transformer-impl transformer_engine)")
         if te else "no: local spec (megatron attention, torch or apex norms)"),
        ("apex", ("yes: fused LayerNorm in the local spec" if apex else
                  "no: torch norms in the local spec")
         + "; Adam is ours either way (narrow state sharded over DP; apex's keeps fp32)"),
        *([("fallbacks", FALLBACK)] if not (te and apex) else []),
        ("sampler: triton", ("yes, compiled for the GPU" if cuda else "yes, interpreted")
         if triton_kernel.available() else
         ("no (needs CUDA, or TRITON_INTERPRET=1)" if triton_kernel.triton else "not installed")),
        ("sampler: cpu (C++)", "yes" if cpu_kernel.available() else "no (PyTorch path)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
