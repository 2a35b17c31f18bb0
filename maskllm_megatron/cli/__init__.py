"""The ``maskllm`` command: one entry point, one subcommand per verb."""

from __future__ import annotations

import argparse
import contextlib
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    """Versions, the device a run would use, and which optional fast paths this machine has."""
    import platform

    import torch

    from maskllm_megatron import __version__
    from maskllm_megatron.model.spec import apex_layer_norm, transformer_engine_modules
    from maskllm_megatron.sampling import cpu_kernel, triton_kernel

    def version(name: str) -> str:
        try:
            from importlib.metadata import version as dist_version

            return dist_version(name)
        except Exception:  # noqa: BLE001 - report, do not fail
            return "not installed"

    cuda = torch.cuda.is_available()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    te = transformer_engine_modules() is not None
    rows = [
        ("maskllm_megatron", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("megatron-core", version("megatron-core")),
        ("device", f"cuda ({torch.cuda.device_count()} x {gpus}), NCCL" if cuda else
         "cpu (no CUDA), gloo; megatron runs through the CPU shims"),
        ("transformer engine", (f"yes ({version('transformer-engine')}): norms and fused "
                                "attention on GPU (--transformer-impl transformer_engine)")
         if te else "no: local spec (megatron attention, torch or apex norms)"),
        ("apex", ("yes: fused LayerNorm in the local spec" if apex_layer_norm() else
                  "no: torch norms in the local spec")
         + "; Adam is ours either way (narrow state sharded over DP; apex's keeps fp32)"),
        ("sampler: triton", ("yes, compiled for the GPU" if cuda else "yes, interpreted")
         if triton_kernel.available() else
         ("no (needs CUDA, or TRITON_INTERPRET=1)" if triton_kernel.triton else "not installed")),
        ("sampler: cpu (C++)", "yes" if cpu_kernel.available() else "no (PyTorch path)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from maskllm_megatron.data.tokenizer import train_tokenizer

    path = train_tokenizer(args.input, args.model_prefix, args.vocab_size, args.model_type)
    print(f"wrote {path}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from maskllm_megatron.data.preprocess import preprocess

    stats = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key)
    print(f"{stats['documents']} documents, {stats['tokens']} tokens -> "
          f"{stats['prefix']}.bin/.idx")
    return 0


def _on_device(device: str | None):
    """The CPU shims around a run whose ranks compute on the CPU; nothing on a GPU."""
    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    chosen = distributed.select_device(device or "auto")
    return cpu_shims() if chosen.type == "cpu" else contextlib.nullcontext()


def _cmd_train(args: argparse.Namespace) -> int:
    from maskllm_megatron.errors import TrainingError
    from maskllm_megatron.training.args import args_from_namespace
    from maskllm_megatron.training.loop import train

    try:
        train_args = args_from_namespace(args)
        with _on_device(train_args.device):
            metrics = train(train_args)
    except TrainingError as err:
        print(f"maskllm train: {err}", file=sys.stderr)
        return 1
    finally:
        from maskllm_megatron import distributed

        distributed.shutdown()
    if metrics:
        print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items()))
    return 0


def _run_distributed(fn, args: argparse.Namespace, name: str) -> int:
    """Run a distributed command on its device (conversion and export: the CPU); a bad input
    is one clear line on stderr, exit code 1."""
    from maskllm_megatron import distributed

    try:
        with _on_device(getattr(args, "device", "cpu")):
            fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"maskllm {name}: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from maskllm_megatron.pruning.oneshot import run_prune

    return _run_distributed(run_prune, args, "prune")


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    from maskllm_megatron.eval.perplexity import run_eval_ppl

    return _run_distributed(run_eval_ppl, args, "eval-ppl")


def _cmd_convert(args: argparse.Namespace) -> int:
    from maskllm_megatron.interop import hf as convert

    def run(a):
        if a.direction == "hf-to-mcore":
            cfg = convert.hf_to_mcore(a.hf, a.out, a.tp, a.pp, a.make_vocab_size_divisible_by,
                                      a.tokenizer, progress=a.progress)
            print(f"wrote {a.out}: megatron-core checkpoint + model_config.json "
                  f"({cfg.transformer.num_layers} layers, vocab {cfg.vocab_size} padded)")
        else:
            print(f"wrote {convert.mcore_to_hf(a.mcore, a.out, progress=a.progress)}")

    return _run_distributed(run, args, f"convert {args.direction}")


def _cmd_trim(args: argparse.Namespace) -> int:
    from maskllm_megatron.deploy.export import trim

    return _run_distributed(lambda a: trim(a.checkpoint, a.out, a.N, a.M), args, "trim")


def _cmd_export(args: argparse.Namespace) -> int:
    from maskllm_megatron.deploy import export
    from maskllm_megatron.deploy.validate import format_report, validate_trtllm

    def run(a):
        if a.target == "trtllm":
            out = export.export_trtllm(a.load, a.out, a.tp, a.pp, a.dtype, a.N, a.M,
                                       progress=a.progress)
            print(format_report(validate_trtllm(out, a.N, a.M)))
            print(f"wrote {out}; build with: trtllm-build --checkpoint_dir {out} "
                  "--output_dir ENGINE_DIR --weight_sparsity  (no --gemm_plugin)")
        else:
            print(f"wrote {export.export_hf(a.load, a.out, a.N, a.M, progress=a.progress)}")

    return _run_distributed(run, args, f"export {args.target}")


def _cmd_validate(args: argparse.Namespace) -> int:
    from maskllm_megatron.deploy.validate import format_report, validate_trtllm

    report = validate_trtllm(args.directory, args.N, args.M)
    print(format_report(report))
    return 0 if report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from maskllm_megatron.demo import main as demo_main

    return _run_distributed(demo_main, args, "demo") if args.tp == 1 or \
        "WORLD_SIZE" in __import__("os").environ else demo_main(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from maskllm_megatron.training.plan import run_plan

    try:
        return run_plan(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"maskllm plan: {err}", file=sys.stderr)
        return 2


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that build a model from a checkpoint."""
    p.add_argument("--config", help="a recipe YAML: its keys fill the flags not given here "
                   "(the trainer's recipes work; keys this command does not take are ignored)")
    p.add_argument("--load", help="checkpoint directory (a run, iter_N or model)")
    p.add_argument("--model-config", help="model_config.json or its directory "
                   "(default: the one beside --load)")
    p.add_argument("--tokenizer", help="default: the model config's tokenizer")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, help="default: the model's max sequence length")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--N", type=int, default=2)
    p.add_argument("--M", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    _add_device_arguments(p)
    p.add_argument("--sequence-parallel", action="store_true",
                   help="split activations along the sequence over TP ranks")
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"],
                   help="norms and attention around the sparse linears (default: Transformer "
                        "Engine on a GPU where it imports, else local)")


def _add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: cuda:LOCAL_RANK when CUDA is present, else the CPU")
    dtype = p.add_mutually_exclusive_group()
    for name in ("bf16", "fp16", "fp32"):
        dtype.add_argument(f"--{name}", action="store_true",
                           help=f"frozen weights in {name} (default: bf16 on a GPU, fp32 on "
                                "the CPU)" if name == "bf16" else f"frozen weights in {name}")


def build_parser() -> argparse.ArgumentParser:
    from maskllm_megatron import __version__

    parser = argparse.ArgumentParser(
        prog="maskllm", description="Learnable N:M sparsity (MaskLLM) for megatron-core models.")
    parser.add_argument("--version", action="version", version=f"maskllm_megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions and available sampler backends")
    info.set_defaults(func=_cmd_info)

    tok = sub.add_parser("train-tokenizer", help="train a SentencePiece model on text files")
    tok.add_argument("input", nargs="+", help="text files")
    tok.add_argument("--model-prefix", required=True, help="writes PREFIX.model")
    tok.add_argument("--vocab-size", type=int, default=4096)
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    tok.set_defaults(func=_cmd_train_tokenizer)

    pre = sub.add_parser("preprocess", help="text / JSONL -> megatron indexed dataset")
    pre.add_argument("input", nargs="+", help=".txt files (one document each) or .jsonl")
    pre.add_argument("--tokenizer", required=True,
                     help="SentencePiece .model or Hugging Face tokenizer directory")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--json-key", default="text")
    pre.set_defaults(func=_cmd_preprocess)

    from maskllm_megatron.training.args import add_train_arguments

    trn = sub.add_parser("train", help="learn N:M masks (or train weights) with TP/PP/DP")
    add_train_arguments(trn)
    trn.set_defaults(func=_cmd_train)

    prn = sub.add_parser("prune", help="one-shot N:M masks (magnitude, Wanda, SparseGPT)")
    _add_model_arguments(prn)
    prn.add_argument("--method", required=True,
                     help="magnitude | wanda | sparsegpt")
    prn.add_argument("--data-path", nargs="+", default=[],
                     help="calibration data (indexed dataset prefixes, as for training)")
    prn.add_argument("--calib-samples", type=int, default=128)
    prn.add_argument("--update-weights", action="store_true",
                     help="keep SparseGPT's weight updates (default: original weights x mask, "
                          "the MaskLLM prior setting)")
    prn.add_argument("--row-parallel-hessian", default="gather", choices=["gather", "shard"],
                     help="SparseGPT on row-parallel layers: the exact full-row problem "
                          "(gather) or each shard's own columns (shard)")
    prn.add_argument("--save", required=True, help="writes SAVE/pruned and SAVE/masks")
    prn.set_defaults(func=_cmd_prune)

    ppl = sub.add_parser("eval-ppl", help="perplexity of a text file (pinned protocol)")
    _add_model_arguments(ppl)
    ppl.add_argument("--text", required=True, help="UTF-8 text file, tokenised whole")
    ppl.add_argument("--masks", default="auto", choices=["auto", "dense"],
                     help="auto: the checkpoint's masks (argmax of logits, or fixed); dense: "
                          "ignore them")
    ppl.set_defaults(func=_cmd_eval_ppl)

    conv = sub.add_parser("convert", help="Hugging Face <-> megatron-core checkpoints")
    way = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h2m = way.add_parser("hf-to-mcore", help="LlamaForCausalLM, NemotronForCausalLM, "
                         "GPT2LMHeadModel -> dist checkpoint + model_config.json")
    h2m.add_argument("--hf", required=True, help="local Hugging Face model directory")
    h2m.add_argument("--out", required=True)
    h2m.add_argument("--tp", type=int, default=1, help="checked against heads and KV groups; "
                     "the vocabulary is padded to a multiple of 128 x TP")
    h2m.add_argument("--pp", type=int, default=1, help="checked against the layer count")
    h2m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    h2m.add_argument("--tokenizer", help="SentencePiece model or HF tokenizer directory "
                     "(default: the tokenizer files in --hf, copied beside the checkpoint)")
    m2h = way.add_parser("mcore-to-hf", help="a converted (or trained) checkpoint -> HF dir")
    m2h.add_argument("--mcore", required=True, help="converted directory or a run directory")
    m2h.add_argument("--out", required=True)
    for p in (h2m, m2h):
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    conv.set_defaults(func=_cmd_convert)

    trm = sub.add_parser("trim", help="hard masks from a training checkpoint; drops logits and "
                         "optimizer state")
    trm.add_argument("checkpoint", help="a run directory, iter_N or model checkpoint")
    trm.add_argument("--out", required=True)
    trm.add_argument("--N", type=int, default=2)
    trm.add_argument("--M", type=int, default=4)
    trm.set_defaults(func=_cmd_trim)

    exp = sub.add_parser("export", help="TensorRT-LLM 2:4 checkpoint or Hugging Face directory")
    target = exp.add_subparsers(dest="target", metavar="TARGET", required=True)
    trt = target.add_parser("trtllm", help="config.json + rank{i}.safetensors, validated")
    trt.add_argument("--tp", type=int, default=1, help="inference tensor parallel size")
    trt.add_argument("--pp", type=int, default=1, help="inference pipeline parallel size")
    trt.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    hfx = target.add_parser("hf", help="HF directory with zeros in place + packed mask file")
    for p in (trt, hfx):
        p.add_argument("--load", required=True, help="trimmed, pruned or training checkpoint")
        p.add_argument("--out", required=True)
        p.add_argument("--N", type=int, default=2)
        p.add_argument("--M", type=int, default=4)
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    exp.set_defaults(func=_cmd_export)

    val = sub.add_parser("validate", help="check an exported checkpoint (no GPU needed)")
    what = val.add_subparsers(dest="format", metavar="FORMAT", required=True)
    vtrt = what.add_parser("trtllm", help="every check of a TensorRT-LLM 2:4 checkpoint")
    vtrt.add_argument("directory")
    vtrt.add_argument("--N", type=int, default=2)
    vtrt.add_argument("--M", type=int, default=4)
    val.set_defaults(func=_cmd_validate)

    pln = sub.add_parser("plan", help="per-GPU memory of a recipe on a cluster; suggests a "
                         "layout that fits")
    pln.add_argument("recipe", help="a YAML recipe (the trainer's flag names)")
    pln.add_argument("--nodes", type=int, default=1)
    pln.add_argument("--gpus-per-node", type=int, default=8)
    pln.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    pln.set_defaults(func=_cmd_plan)

    dem = sub.add_parser("demo", help="the whole method on CPU: pretrain, one-shot baselines, "
                         "MaskLLM, perplexities, export (about 20 minutes on 2 cores)")
    dem.add_argument("--workdir", default="~/.cache/maskllm/demo",
                     help="every step is cached here; a rerun skips what is done")
    dem.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (gloo on CPU)")
    dem.add_argument("--size", default="default", choices=["default", "tiny"])
    dem.add_argument("--pretrain-iters", type=int)
    dem.add_argument("--mask-iters", type=int)
    dem.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    dem.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                     help="auto: cuda:LOCAL_RANK when CUDA is present, else the CPU")
    dem.set_defaults(func=_cmd_demo)
    return parser


def apply_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """prune / eval-ppl: fill unset flags from ``--config`` (trainer recipes use the same
    names), with ``~`` expanded in paths."""
    import os

    import yaml

    recipe = yaml.safe_load(open(os.path.expanduser(args.config))) or {}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parser = commands.choices[args.command]  # defaults live on the subcommand's parser
    for key, value in recipe.items():
        name = key.replace("-", "_")
        if name == "save":
            continue  # the trainer's output directory, not this command's
        if hasattr(args, name) and getattr(args, name) in (None, [], parser.get_default(name)):
            setattr(args, name, os.path.expanduser(value) if isinstance(value, str) else value)
    if isinstance(getattr(args, "data_path", None), list):
        args.data_path = [os.path.expanduser(str(p)) for p in args.data_path]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("prune", "eval-ppl"):
        if args.config:
            apply_recipe(args, parser)
        if not args.load:
            parser.error(f"{args.command}: --load is required (or a --config that sets load)")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)

