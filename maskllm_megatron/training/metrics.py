"""What a run shows its user: mask statistics, the memory table, progress bar, JSONL and
TensorBoard logs, and the curves plotted at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from maskllm_megatron import distributed
from maskllm_megatron.model.layers import sparse_layers
from maskllm_megatron.paths import write_file_atomically
from maskllm_megatron.training.args import TrainArgs
from maskllm_megatron.training.optim import ShardedAdamW


def argmax_snapshot(model) -> dict[int, torch.Tensor]:
    return {id(layer): layer.mask_logits.detach().argmax(-1).to(torch.uint8)
            for _, layer in sparse_layers(model) if layer.mode == "learn"}


@torch.no_grad()
def mask_statistics(model, previous: dict, state) -> dict:
    """Share of groups whose argmax flipped since the last log; mean max-probability of
    softmax(kappa * logits / tau) (the noise-free soft index). One host sync in all."""
    sums = torch.zeros(3, dtype=torch.float64, device=distributed.device())  # flips, max-p, groups
    for _, layer in sparse_layers(model):
        if layer.mode != "learn":
            continue
        logits = layer.mask_logits.detach()
        argmax = logits.argmax(-1).to(torch.uint8)
        if id(layer) in previous:
            sums[0] += (argmax != previous[id(layer)]).sum()
        probs = torch.softmax(state.kappa * logits / state.tau, dim=-1)
        sums[1] += probs.amax(-1).double().sum()
        sums[2] += argmax.numel()
    dist.all_reduce(sums, group=ps.get_model_parallel_group())
    flips, max_prob, groups = sums.tolist()
    groups = max(1.0, groups)
    return {"flip_rate": flips / groups, "max_prob": max_prob / groups}


def memory_table(model, optimizer: ShardedAdamW) -> list[tuple[str, float]]:
    """(what, bytes) of this rank's training state; the last row is bytes per prunable weight.

    Trained parameters, their gradient buffers, Adam moments and main copies count as training
    state; the frozen weights are listed but not counted (they are the model)."""
    prunable = frozen = 0
    for _, layer in sparse_layers(model):
        prunable += layer.weight.numel()
        if not layer.weight.requires_grad:
            frozen += layer.weight.numel() * layer.weight.element_size()
    held = optimizer.state_bytes()
    rows = [("frozen sparse weights", frozen), ("trained parameters", held["param"]),
            ("gradient buffers (main_grad)", held["main_grad"]),
            ("Adam exp_avg (this DP slice)", held["exp_avg"]),
            ("Adam exp_avg_sq (this DP slice)", held["exp_avg_sq"])]
    if held["main_param"]:
        rows.append(("fp32 main copies (this DP slice)", held["main_param"]))
    return rows + [("per prunable weight", sum(held.values()) / max(1, prunable))]


def print_memory_table(model, optimizer: ShardedAdamW, args: TrainArgs) -> None:
    rows = memory_table(model, optimizer)
    fmt = args.optimizer_format()
    dp = ps.get_data_parallel_world_size()
    print(f"training state of rank 0 on {distributed.device()} (gradients "
          f"{fmt['main_grads_dtype']}, exp_avg {fmt['exp_avg_dtype']}, exp_avg_sq "
          f"{fmt['exp_avg_sq_dtype']}, sharded over DP {dp})")
    for name, value in rows[:-1]:
        print(f"  {name:<34} {value / 2**20:10.2f} MiB")
    print(f"  {'per prunable weight':<34} {rows[-1][1]:10.2f} bytes "
          "(trained parameters + gradients + optimizer state)")


def progress_label(args: TrainArgs) -> str:
    """What the progress bar says runs: ``--progress-label``, else what the flags train."""
    if args.progress_label:
        return args.progress_label
    if args.dense:
        return "dense pretraining"
    return "mask and weight learning" if args.train_weights else "mask learning"


class TrainingLog:
    """Progress bar, JSONL log and TensorBoard scalars on rank 0; PNG curves at the end.

    A record's ``loss`` is the LM loss and ``reg`` the regulariser ``sum ||W * M~||^2`` (every
    stage's and TP shard's layers), kept apart; the step minimised
    ``loss - reg_weight * reg`` (the paper's sign, ``training.step.REGULARIZER_SIGN``)."""

    def __init__(self, args: TrainArgs, active: bool, start: int):
        self.active, self.args = active, args
        self.records: list[dict] = []
        self.jsonl = self.bar = self.board = None
        if not active:
            return
        out = Path(args.save) if args.save else None
        if out:
            out.mkdir(parents=True, exist_ok=True)
            _drop_records_after(out / "train_log.jsonl", start)
            self.jsonl = (out / "train_log.jsonl").open("a")
        if args.tensorboard_dir:
            try:  # optional: tensorboard
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(args.tensorboard_dir)
            except ImportError:
                print("tensorboard is not installed: no TensorBoard scalars")
        self.bar = tqdm(total=args.train_iters, initial=start, desc=progress_label(args),
                        disable=not args.progress, dynamic_ncols=True)
        self.started = time.time()

    def note(self, message: str) -> None:
        if self.active:
            (self.bar.write if self.bar else print)(message)

    def log(self, metrics: dict) -> None:
        if not self.active:
            return
        self.records.append(dict(metrics))
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
            self.jsonl.flush()
        if self.board:
            for key, value in metrics.items():
                if key != "iteration":
                    self.board.add_scalar(f"train/{key}", value, metrics["iteration"])
        self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in
                              ("loss", "tau", "kappa", "lr", "flip_rate", "max_prob")
                              if k in metrics}, refresh=False)
        self.bar.update(metrics["iteration"] - self.bar.n)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.board:
            self.board.close()
        if self.args.save and self.records:
            plot_training_log(Path(self.args.save) / "train_log.jsonl",
                              Path(self.args.save) / "train_curves.png")


def _drop_records_after(log_path: Path, iteration: int) -> None:
    """A run killed after logging iteration N but before saving it resumes from an earlier
    checkpoint and logs N again: keep the log to what the resumed checkpoint had done."""
    if not log_path.exists():
        return
    lines = [line for line in log_path.read_text().splitlines()
             if line.strip() and json.loads(line)["iteration"] <= iteration]
    write_file_atomically(log_path, "".join(line + "\n" for line in lines))


def plot_training_log(log_path: Path, png_path: Path) -> Path | None:
    """Loss and flip-rate curves from a JSONL log."""
    try:  # optional: matplotlib
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    its = [r["iteration"] for r in rows]
    axes[0].plot(its, [r["loss"] for r in rows], label="train loss")
    val = [(r["iteration"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        axes[0].plot(*zip(*val, strict=True), "o-", label="val loss (hard masks)")
    axes[0].set_xlabel("iteration")
    axes[0].legend()
    flips = [(r["iteration"], r["flip_rate"]) for r in rows if "flip_rate" in r]
    if flips:
        axes[1].plot(*zip(*flips, strict=True))
        if any(rate > 0 for _, rate in flips):  # a log axis needs a positive value
            axes[1].set_yscale("log")
    axes[1].set_xlabel("iteration")
    axes[1].set_title("share of groups whose argmax flipped")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
