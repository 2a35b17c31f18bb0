"""The ``maskllm`` command: one entry point, one subcommand per verb."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    """Versions and which sampler backends this machine can run."""
    import platform

    import torch

    from . import __version__
    from .sampling import cpu_kernel, triton_kernel

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001 - report, do not fail
        mcore = "not installed"
    rows = [
        ("maskllm_megatron", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("megatron-core", mcore),
        ("cuda available", str(torch.cuda.is_available())),
        ("sampler: triton", "yes" if triton_kernel.available() else
         ("no (needs CUDA, or TRITON_INTERPRET=1)" if triton_kernel.triton else "not installed")),
        ("sampler: cpu (C++)", "yes" if cpu_kernel.available() else "no (PyTorch path)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="maskllm", description="Learnable N:M sparsity (MaskLLM) for megatron-core models.")
    parser.add_argument("--version", action="version", version=f"maskllm_megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions and available sampler backends")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
