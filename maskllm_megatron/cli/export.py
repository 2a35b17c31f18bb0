"""``maskllm export``: a TensorRT-LLM 2:4 checkpoint (validated) or a Hugging Face directory."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter, add_pattern_arguments


def add_parsers(sub: typing.Any) -> None:
    exp = sub.add_parser("export", help="TensorRT-LLM 2:4 checkpoint or Hugging Face directory",
                         formatter_class=HelpFormatter)
    target = exp.add_subparsers(dest="target", metavar="TARGET", required=True)
    trt = target.add_parser("trtllm", help="config.json + rank{i}.safetensors, validated",
                            formatter_class=HelpFormatter)
    trt.add_argument("--tp", type=int, default=1, help="inference tensor parallel size (GPUs)")
    trt.add_argument("--pp", type=int, default=1, help="inference pipeline parallel size")
    trt.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                     help="dtype of the exported weights")
    hfx = target.add_parser("hf", help="HF directory with zeros in place + packed mask file",
                            formatter_class=HelpFormatter)
    for p in (trt, hfx):
        p.add_argument("--load", required=True,
                       help="trimmed, pruned or training checkpoint (required)")
        p.add_argument("--out", required=True, help="output directory (required)")
        add_pattern_arguments(p)
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="progress bar")
    exp.set_defaults(func=run)


def _export(args: argparse.Namespace) -> None:
    from maskllm_megatron.deploy import export
    from maskllm_megatron.deploy.validate import format_report, validate_trtllm

    if args.target == "trtllm":
        from maskllm_megatron.paths import require_separate

        require_separate(args.out, args.load)  # before the load, as export_trtllm would
        loaded = export.load_for_export(args.load, args.N, args.M)
        out = export.export_trtllm(args.load, args.out, args.tp, args.pp, args.dtype, args.N,
                                   args.M, progress=args.progress, loaded=loaded)
        print(format_report(validate_trtllm(out, args.N, args.M)))
        print(f"wrote {out}; build with: trtllm-build --checkpoint_dir {out} "
              "--output_dir ENGINE_DIR --weight_sparsity  (no --gemm_plugin)")
        note = export.trtllm_runtime_note(loaded[1])
        if note:
            print(note)
    else:
        out = export.export_hf(args.load, args.out, args.N, args.M, progress=args.progress)
        print(f"wrote {out}")


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import run_in_process_group

    return run_in_process_group(_export, args)
