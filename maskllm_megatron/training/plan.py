"""Per-GPU memory of a training run at a cluster size, before anyone queues a job.

Per GPU (bytes), for a model with L layers, hidden h, FFN f, heads a, KV groups g, head dim d,
vocabulary V, at TP t and PP p (the first pipeline stage is the fullest; it is the one planned):

* frozen weights: the stage's L/p layers' linears and norms, bf16 (2 B), divided by t; the
  embedding (V x h / t) on the first stage, the output layer on the last (or the first, tied);
* mask state per prunable weight of the stage's linears / t: fp32 logits (1.5 x 4 B for 2:4)
  and their bf16 gradient buffer (1.5 x 2 B), both full on every rank, plus two bf16 Adam
  moments sharded over data parallel (1.5 x 2 x 2 B / DP): 15 B at DP=1, 9.75 B at DP=8 (the
  trainer's defaults);
* masked-weight copies: each linear's ``W * mask`` (bf16) is kept for backward: 2 B per
  prunable weight of the stage;
* activations (Korthikanti et al. 2022, no recomputation, no sequence parallel):
  ``s b h (10 + 24/t + 5 a s / (h t))`` bytes per layer per micro-batch, times the stage's
  layers, times the micro-batches 1F1B keeps in flight on the first stage (min(p, m));
  plus the logits ``4 s b V / t`` (fp32) on the last stage;
* with distillation (``--kd-weight``) the micro-batch is doubled: activations at ``2 b``
  (an upper bound: the teacher half's sparse matmuls keep nothing, 1.65x measured by
  ``bench/bench_train_step.py``) and four logits-sized fp32 tensors (student, teacher, the
  cross-entropy's softmax, the KL's gradient).

DP = nodes x GPUs / (t x p). A layout fits when the total is below 90% of the GPU memory (the
rest is the CUDA context, allocator slack and communication buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from maskllm_megatron.errors import InputError
from maskllm_megatron.model.config import ModelConfig
from maskllm_megatron.training.args import TrainArgs

HEADROOM = 0.9


@dataclass
class Plan:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    rows: dict[str, float]  # bytes per GPU
    gpu_bytes: float
    prunable: float  # prunable weights on the planned GPU

    @property
    def state_bytes_per_weight(self) -> float:
        """Training state (logits, their gradients, Adam moments) per prunable weight."""
        return sum(v for k, v in self.rows.items()
                   if k.startswith(("mask logits", "logit gradients", "Adam"))) / self.prunable

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.gpu_bytes


def _sizes(cfg: ModelConfig) -> dict:
    t = cfg.transformer
    h, a, d = t.hidden_size, t.num_attention_heads, t.kv_channels
    g, f = t.num_query_groups, t.ffn_hidden_size
    fc1_rows = 2 * f if t.gated_linear_unit else f
    linear = (a * d + 2 * g * d) * h + h * a * d + fc1_rows * h + h * f
    return {"h": h, "a": a, "L": t.num_layers, "V": cfg.vocab_size, "linear": linear,
            "norms": 4 * h}


def plan_layout(cfg: ModelConfig, tp: int, pp: int, world: int, seq: int, micro_batch: int,
                global_batch: int, gpu_gb: float, pattern_candidates: int = 6,
                pattern_m: int = 4, kd: bool = False) -> Plan:
    z = _sizes(cfg)
    layers = z["L"] // pp
    prunable = layers * z["linear"] / tp
    logits_per_weight = pattern_candidates / pattern_m
    embedding = z["V"] * z["h"] / tp
    frozen = 2 * (prunable + layers * z["norms"] + embedding
                  + (embedding if pp == 1 and not cfg.share_embeddings_and_output_weights
                     else 0))
    dp = world // (tp * pp)
    microbatches = max(1, global_batch // (micro_batch * max(1, dp)))
    in_flight = min(pp, microbatches)
    s, b, h, a = seq, micro_batch * (2 if kd else 1), z["h"], z["a"]
    per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    activations = per_layer * layers * in_flight
    logits_out = 4 * s * micro_batch * z["V"] / tp * (4 if kd else 1) if pp == 1 else 0
    rows = {"frozen weights (bf16)": frozen,
            "mask logits (fp32)": prunable * logits_per_weight * 4,
            "logit gradients (bf16)": prunable * logits_per_weight * 2,
            f"Adam state (bf16, 1/{dp} per rank)": prunable * logits_per_weight * 2 * 2 / dp,
            "masked-weight copies": 2 * prunable, "activations": activations + logits_out}
    return Plan(tp, pp, dp, micro_batch, rows, gpu_gb * 2**30, prunable)


def suggest(cfg: ModelConfig, world: int, seq: int, global_batch: int, gpu_gb: float,
            gpus_per_node: int, kd: bool = False) -> Plan | None:
    """The smallest TP (within a node), then PP, then the largest micro-batch that fits."""
    a, g = cfg.transformer.num_attention_heads, cfg.transformer.num_query_groups
    layers = cfg.transformer.num_layers
    for tp in (t for t in (1, 2, 4, 8) if t <= gpus_per_node and a % t == 0 and g % t == 0):
        for pp in (p for p in range(1, layers + 1) if layers % p == 0 and world % (tp * p) == 0):
            for mbs in (4, 2, 1):
                dp = world // (tp * pp)
                if global_batch % (mbs * dp):
                    continue
                plan = plan_layout(cfg, tp, pp, world, seq, mbs, global_batch, gpu_gb, kd=kd)
                if plan.fits:
                    return plan
    return None


def plan_training(args: TrainArgs, nodes: int, gpus_per_node: int,
                  gpu_gb: float) -> tuple[Plan, Plan | None]:
    """The layout ``args`` asks for on ``nodes`` x ``gpus_per_node`` GPUs of ``gpu_gb`` GiB and,
    when it does not fit, the one ``suggest`` finds (None: nothing fits)."""
    source = args.model_config or args.load
    if not source:
        raise InputError("the recipe names no model_config (or load) to plan for; add one")
    cfg = ModelConfig.load(Path(source).expanduser())
    world = nodes * gpus_per_node
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    seq = args.seq_length or cfg.max_sequence_length
    if world % (tp * pp):
        raise InputError(f"{world} GPUs are not a multiple of TP {tp} x PP {pp}; choose sizes "
                         "whose product divides --nodes x --gpus-per-node")
    kd = args.kd_weight > 0
    plan = plan_layout(cfg, tp, pp, world, seq, args.micro_batch_size, args.global_batch_size,
                       gpu_gb, kd=kd)
    if plan.fits:
        return plan, None
    return plan, suggest(cfg, world, seq, args.global_batch_size, gpu_gb, gpus_per_node, kd=kd)
