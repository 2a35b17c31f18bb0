"""``maskllm eval-tasks``: zero-shot tasks through lm-evaluation-harness (offline)."""

from __future__ import annotations

import argparse
import typing

from maskllm_megatron.cli.options import HelpFormatter, add_model_arguments

PAPER_TASKS = "hellaswag,piqa,winogrande,arc_easy,arc_challenge,openbookqa,race"


def _limit(text: str) -> int | float:
    """lm-eval's --limit: a count of documents per task, or a fraction below 1."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def add_parsers(sub: typing.Any) -> None:
    tasks = sub.add_parser("eval-tasks", help="zero-shot tasks through lm-evaluation-harness "
                           "(the optional [eval] extra)", formatter_class=HelpFormatter)
    add_model_arguments(tasks)
    for action in tasks._actions:  # --batch-size (lm-eval's name) is this command's
        if action.dest == "micro_batch_size":
            action.help = argparse.SUPPRESS
    tasks.add_argument("--tasks", default=PAPER_TASKS, metavar="A,B,...",
                       help="lm-eval task (or group) names, comma-separated (default: the "
                            f"paper's seven, {PAPER_TASKS})")
    tasks.add_argument("--include-path", metavar="DIR",
                       help="a folder of task YAMLs (local data files, or tasks of the same "
                            "name that replace lm-eval's own; default: lm-eval's tasks only)")
    tasks.add_argument("--num-fewshot", type=int, default=0,
                       help="examples in each prompt (default: 0, zero-shot, as the paper)")
    tasks.add_argument("--batch-size", type=int, default=8,
                       help="requests per forward pass on one rank")
    tasks.add_argument("--limit", type=_limit,
                       help="documents per task (a fraction below 1: that share); for quick "
                            "checks only (default: all)")
    tasks.add_argument("--output", metavar="FILE.json",
                       help="write lm-eval's result JSON here (default: only the table)")
    tasks.add_argument("--log-samples", action="store_true",
                       help="also put lm-eval's per-document samples (requests, "
                            "log-likelihoods, metrics) in --output, under \"samples\"")
    tasks.add_argument("--masks", default="auto", choices=["auto", "dense"],
                       help="auto: the checkpoint's masks (argmax of logits, or fixed); dense: "
                            "ignore them")
    tasks.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskllm_megatron.cli.device import model_layout, run_in_process_group
    from maskllm_megatron.eval.tasks import parse_tasks, require_lm_eval

    parse_tasks(args.tasks)  # bad input fails before any process group starts
    require_lm_eval()
    return run_in_process_group(_evaluate, args, **model_layout(args))


def _evaluate(args: argparse.Namespace) -> None:
    from maskllm_megatron.cli.device import is_rank0
    from maskllm_megatron.eval.tasks import evaluate_checkpoint

    r = evaluate_checkpoint(args)
    if is_rank0():
        print(f"{r.checkpoint} (masks: {r.masks}, {args.num_fewshot}-shot)")
        print(r.table, end="" if r.table.endswith("\n") else "\n")
        if args.output:
            print(f"results: {args.output}")
