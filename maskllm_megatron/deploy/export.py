"""What users deploy: ``trim`` (hard masks from a training run), TensorRT-LLM 2:4 checkpoints, and
Hugging Face directories with a packed mask file.

Every exporter loads the checkpoint once, in one process, at TP=1 x PP=1 (the checkpoint is
layout-free), applies its masks (argmax of logits, or fixed masks), and writes the target layout
from the full tensors: inference TP/PP never depend on the training layout. Output directories
are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.integrity import seal, verify, verify_model_files
from maskllm_megatron.checkpoint.model import load_sparse_model, save_model
from maskllm_megatron.checkpoint.run_dir import model_dir
from maskllm_megatron.checkpoint.safe_load import read_json
from maskllm_megatron.core.nm import (
    NMPattern,
    bits_per_weight,
    indices_to_mask,
    is_nm_sparse,
    mask_to_indices,
    pack_indices,
    unpack_indices,
)
from maskllm_megatron.deploy.validate import SPARSE_SUFFIXES, format_report, validate_trtllm
from maskllm_megatron.errors import CheckpointError, InputError
from maskllm_megatron.interop.hf import (
    HF_CONFIG,
    TensorMapping,
    architecture,
    hf_config_from_model_config,
    mcore_to_hf,
    qkv_from_mcore,
)
from maskllm_megatron.model.config import ModelConfig, copy_model_files
from maskllm_megatron.model.layers import fix_masks, sparse_layers
from maskllm_megatron.paths import atomic_directory, require_path, require_separate

TRT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExportError(InputError):
    """The checkpoint cannot be exported as asked (not N:M, layout does not divide, ...)."""


def load_for_export(load: str | Path, n: int = 2, m: int = 4):
    """Load a checkpoint once for every exporter: (model at TP=1 x PP=1 with its masks
    applied, ModelConfig, mask mode, pattern, the directory holding model_config.json, the
    model checkpoint directory)."""
    distributed.use_layout(1, 1, what="export")  # whole tensors on every rank
    require_path(load, "checkpoint")
    source = model_dir(load)
    verify_model_files(load, source, source.parent)
    config_dir = next((d for d in (Path(load), source, source.parent)
                       if (d / "model_config.json").exists()), None)
    if config_dir is None:
        raise CheckpointError(f"{load}: no model_config.json beside it, so it is not a maskllm "
                              "checkpoint; give a directory written by `maskllm convert`, "
                              "`prune`, `train` or `trim`")
    cfg = ModelConfig.load(config_dir)
    model, mode, pattern = load_sparse_model(source, cfg, NMPattern(n, m))
    _check_mask_indices(model, source)
    return model, cfg, mode, pattern, config_dir, source


def _check_mask_indices(model, source: Path) -> None:
    """Fixed masks index the pattern's candidates: a larger index is a corrupted (or
    tampered) checkpoint, refused before any weight is masked with it."""
    for name, layer in sparse_layers(model):
        if layer.mode != "fixed":
            continue
        candidates = layer.mask_settings.pattern.num_candidates
        largest = int(layer.mask_indices.max()) if layer.mask_indices.numel() else 0
        if largest >= candidates:
            raise CheckpointError(
                f"{source}: {name}.mask_indices holds candidate {largest} but "
                f"{layer.mask_settings.pattern} has {candidates}; the checkpoint is corrupted: "
                "prune or trim again")


@torch.no_grad()
def masked_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict with every sparse layer's weight multiplied by its mask."""
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith(("_extra_state", "mask_logits", "mask_indices"))}
    for name, layer in sparse_layers(model):
        state[f"{name}.weight"] = layer.masked_weight(layer.weight).detach()
    return state


# ----------------------------------------------------------------------------- trim


@dataclass
class TrimReport:
    """What ``trim`` kept and dropped: per-layer sparsity rows (the last one the total)."""

    out: Path
    pattern: NMPattern
    rows: list[tuple[str, tuple[int, ...], float]]  # (layer, weight shape, share of zeros)
    logits_bytes: int
    optimizer_bytes: int
    mask_bytes: int  # uint8 candidate indices

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.mask_bytes / max(1, self.rows[-1][1][0])

    @property
    def packed_bits_per_weight(self) -> float:
        """What ``export hf`` packs the same masks to."""
        return bits_per_weight(self.pattern)


@torch.no_grad()
def trim(load: str | Path, out: str | Path, n: int = 2, m: int = 4) -> TrimReport:
    """Hard masks from a training checkpoint: argmax of the logits, stored as candidate indices
    (uint8, one per group). Logits and optimizer state are dropped."""
    require_separate(out, load)
    model, cfg, mode, pattern, config_dir, source = load_for_export(load, n, m)
    if mode == "dense":
        raise ExportError(f"{load} holds no masks (a dense checkpoint): nothing to trim; "
                          "trim a mask-learning run (maskllm train --save)")
    logits_bytes = sum(layer.mask_logits.numel() * 4 for _, layer in sparse_layers(model)
                       if hasattr(layer, "mask_logits"))
    optimizer = source.parent / "optimizer"  # beside a training run's model checkpoint
    optimizer_bytes = sum(p.stat().st_size for p in optimizer.rglob("*") if p.is_file()) \
        if optimizer.is_dir() else 0
    fix_masks(model)
    rows = []
    for name, layer in sparse_layers(model):
        weight = layer.masked_weight(layer.weight)
        rows.append((name, tuple(weight.shape), float((weight == 0).double().mean())))
    out = Path(out)
    with atomic_directory(out) as tmp:
        save_model(model, tmp)

        def describe() -> None:
            copy_model_files(config_dir, tmp)
            cfg.save(tmp)
            seal(tmp)

        distributed.on_rank0(describe)
    masks = sum(layer.mask_indices.numel() for _, layer in sparse_layers(model))
    weights = sum(math.prod(shape) for _, shape, _ in rows)
    zeros = sum(math.prod(shape) * sparsity for _, shape, sparsity in rows)
    rows.append(("total", (weights,), zeros / max(1, weights)))
    return TrimReport(out, pattern, rows, logits_bytes, optimizer_bytes, masks)


# ----------------------------------------------------------------------------- TensorRT-LLM


def _trt_kind(cfg: ModelConfig) -> str:
    """Which TensorRT-LLM model the checkpoint becomes, from its shape alone (so models not
    converted from HF export too): ``qwen3`` (q/k layernorm) and ``qwen2`` (q/k/v biases
    without o_proj's) as QWenForCausalLM, ``llama`` (LLaMA, Mistral) as LlamaForCausalLM,
    ``nemotron`` and ``gpt`` as GPTForCausalLM."""
    t = cfg.transformer
    if t.gated_linear_unit:
        if t.activation != "silu":
            raise ExportError(f"gated MLP with {t.activation}: only SwiGLU (LLaMA, Qwen, "
                              "Mistral) is exported")
        if t.qk_layernorm:
            return "qwen3"
        if t.add_qkv_bias and not t.add_bias_linear:
            return "qwen2"
        return "llama"
    if t.qk_layernorm:
        raise ExportError("q/k layernorm is exported for Qwen3 (SwiGLU) only")
    if t.layernorm_zero_centered_gamma or t.activation == "squared_relu":
        return "nemotron"
    return "gpt"


def trtllm_config(cfg: ModelConfig, tp: int, pp: int, dtype: str, pattern: NMPattern) -> dict:
    """config.json for GPTForCausalLM (GPT-3 style, Nemotron), LlamaForCausalLM (LLaMA,
    Mistral) or QWenForCausalLM (Qwen2/2.5, Qwen3), with the keys TensorRT-LLM's own
    converters write for each and the minimal ``mapping`` and ``quantization`` dicts the
    reference asks for. Mistral's sliding window is not in it: TensorRT-LLM takes it at run time
    (``max_attention_window_size``)."""
    t = cfg.transformer
    kind = _trt_kind(cfg)
    h, nh, head = t.hidden_size, t.num_attention_heads, t.kv_channels
    common = {
        "dtype": dtype, "logits_dtype": "float32",
        "vocab_size": cfg.true_vocab_size or cfg.vocab_size, "hidden_size": h,
        "num_hidden_layers": t.num_layers, "num_attention_heads": nh,
        "num_key_value_heads": t.num_query_groups, "head_size": head,
        "intermediate_size": t.ffn_hidden_size, "norm_epsilon": t.layernorm_epsilon,
        "max_position_embeddings": cfg.max_sequence_length,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "sparsity": str(pattern),  # informational; TensorRT-LLM accepts unknown top-level keys
    }
    rope = {"hidden_act": "silu", "position_embedding_type": "rope_gpt_neox",
            "rotary_base": cfg.rotary_base, "rotary_scaling": None}
    if kind in ("qwen2", "qwen3"):
        # QWenConfig: attn_bias is q/k/v only (o_proj never has one), qwen_type picks Qwen3's
        # per-head q/k RMSNorm (attention.q_layernorm / k_layernorm)
        if t.add_bias_linear:
            raise ExportError("Qwen with o_proj or MLP biases has no QWenForCausalLM "
                              "counterpart")
        return {"architecture": "QWenForCausalLM", **common, **rope, "qwen_type": kind,
                "attn_bias": t.add_qkv_bias, "mlp_bias": False,
                "qk_layernorm": kind == "qwen3", "rotary_embedding_dim": head,
                "use_logn_attn": False, "seq_length": cfg.max_sequence_length,
                "moe_intermediate_size": 0, "moe_shared_expert_intermediate_size": 0,
                "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
                "moe": {"num_experts": 0, "top_k": 0, "normalization_mode": 0}}
    if kind == "llama":  # attn_bias: q/k/v and o_proj (megatron: add_bias_linear)
        return {"architecture": "LlamaForCausalLM", **common, **rope,
                "mlp_bias": t.add_bias_linear, "attn_bias": t.add_bias_linear}
    rope = cfg.position_embedding_type == "rope"
    act = {"squared_relu": "squared-relu", "relu": "relu"}.get(t.activation, "gelu")
    return {"architecture": "GPTForCausalLM", **common, "hidden_act": act,
            "position_embedding_type": "rope_gpt_neox" if rope else "learned_absolute",
            "rotary_embedding_dim": int(head * cfg.rotary_percent) if rope else head,
            "rotary_pct": cfg.rotary_percent if rope else 1.0,
            "rotary_base": cfg.rotary_base, "rotary_scaling": None, "qk_layernorm": False,
            "gpt_variant": "nemotron" if kind == "nemotron" else "gpt2",
            "bias": t.add_bias_linear, "q_scaling": 1.0,
            "embedding_scale": None, "apply_query_key_layer_scaling": False,
            "inner_layernorm": False, "norm_before_bmm1": False,
            "moe": {"num_experts": 0, "top_k": 0, "normalization_mode": 1}}


def trtllm_runtime_note(cfg: ModelConfig) -> str | None:
    """What the TensorRT-LLM checkpoint leaves to the runtime, for the user: a sliding window
    (Mistral) is set per run, not stored (TensorRT-LLM's Mistral is LLaMA plus this setting)."""
    window = cfg.transformer.window_size
    if not window:
        return None
    tokens = window[0] + 1
    return (f"sliding window of {tokens} tokens: not in the checkpoint, TensorRT-LLM applies it "
            f"at run time; run with --max_attention_window_size {tokens} (examples/run.py, "
            f"summarize.py) or KvCacheConfig(max_attention_window=[{tokens}]) in the LLM API")


def check_layout(cfg: ModelConfig, tp: int, pp: int, pattern: NMPattern) -> None:
    """Refuse a TensorRT-LLM layout that splits heads, layers or N:M groups unevenly, before
    any rank is written."""
    t = cfg.transformer
    nh, nkv, f, head = t.num_attention_heads, t.num_query_groups, t.ffn_hidden_size, t.kv_channels
    problems = []
    if nh % tp:
        problems.append(f"{nh} heads")
    if nkv % tp and tp % nkv:
        problems.append(f"{nkv} key-value heads (TP must divide them or be a multiple)")
    if f % tp:
        problems.append(f"intermediate size {f}")
    if t.num_layers % pp:
        problems.append(f"{t.num_layers} layers (PP)")
    for what, k in (("attention.dense", nh * head), ("mlp.proj", f)):
        if (k // tp) % pattern.m:
            problems.append(f"{what}: row-parallel shards of {k} // {tp} = {k // tp} input "
                            f"columns are not a multiple of M={pattern.m}")
    if problems:
        raise ExportError(f"TP={tp} x PP={pp} does not fit: " + "; ".join(problems))


def _rank_tensors(state: dict, cfg: ModelConfig, tp: int, pp: int, tp_rank: int,
                  pp_rank: int) -> dict[str, torch.Tensor]:
    t = cfg.transformer
    kind = _trt_kind(cfg)
    gated = kind in ("llama", "qwen2", "qwen3")
    h, nh, nkv, d = t.hidden_size, t.num_attention_heads, t.num_query_groups, t.kv_channels
    vocab = cfg.true_vocab_size or cfg.vocab_size
    zero_centered = t.layernorm_zero_centered_gamma
    rms = t.normalization == "RMSNorm"
    out: dict[str, torch.Tensor] = {}

    def col(x):  # column parallel: split rows
        return x.chunk(tp, dim=0)[tp_rank]

    def row(x):  # row parallel: split input columns
        return x.chunk(tp, dim=1)[tp_rank]

    def norm(src: str, dst: str) -> None:
        weight = state[f"{src}.weight"]
        out[f"{dst}.weight"] = weight.float() + 1 if zero_centered else weight
        if not rms:
            out[f"{dst}.bias"] = state[f"{src}.bias"]

    def kv_split(x):
        if nkv < tp:  # duplicate KV heads so every rank holds one
            x = x.reshape(nkv, d, *x.shape[1:]).repeat_interleave(tp // nkv, 0)
            x = x.reshape(-1, *x.shape[2:])
        return col(x)

    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = state["embedding.word_embeddings.weight"][
            :vocab]
        if cfg.position_embedding_type == "learned_absolute":
            out["transformer.position_embedding.weight"] = state[
                "embedding.position_embeddings.weight"]
    per_stage = t.num_layers // pp
    for j in range(per_stage):
        m = f"decoder.layers.{pp_rank * per_stage + j}."
        p = f"transformer.layers.{j}."
        norm(m + "input_layernorm", p + "input_layernorm")
        norm(m + "pre_mlp_layernorm", p + "post_layernorm")
        for suffix in ("weight", "bias"):
            key = m + f"self_attention.linear_qkv.{suffix}"
            if key not in state:
                continue
            q, k, v = qkv_from_mcore(state[key], nkv, nh * d, nkv * d)
            out[p + f"attention.qkv.{suffix}"] = torch.cat([col(q), kv_split(k), kv_split(v)])
        for qk in ("q", "k"):  # Qwen3: per-head RMSNorm, replicated
            if m + f"self_attention.{qk}_layernorm.weight" in state:
                norm(m + f"self_attention.{qk}_layernorm", p + f"attention.{qk}_layernorm")
        out[p + "attention.dense.weight"] = row(state[m + "self_attention.linear_proj.weight"])
        fc1 = state[m + "mlp.linear_fc1.weight"]
        if gated:  # TensorRT-LLM: fc = gate (activated), gate = up
            gate, up = fc1.chunk(2)
            out[p + "mlp.fc.weight"], out[p + "mlp.gate.weight"] = col(gate), col(up)
        else:
            out[p + "mlp.fc.weight"] = col(fc1)
        out[p + "mlp.proj.weight"] = row(state[m + "mlp.linear_fc2.weight"])
        if m + "self_attention.linear_proj.bias" in state:
            out[p + "attention.dense.bias"] = state[m + "self_attention.linear_proj.bias"]
            fc1b = state[m + "mlp.linear_fc1.bias"]
            if gated:
                gate, up = fc1b.chunk(2)
                out[p + "mlp.fc.bias"], out[p + "mlp.gate.bias"] = col(gate), col(up)
            else:
                out[p + "mlp.fc.bias"] = col(fc1b)
            out[p + "mlp.proj.bias"] = state[m + "mlp.linear_fc2.bias"]
    if pp_rank == pp - 1:
        norm("decoder.final_layernorm", "transformer.ln_f")
        head = state.get("output_layer.weight", state["embedding.word_embeddings.weight"])
        rows = math.ceil(vocab / tp) * tp
        padded = torch.zeros(rows, h, dtype=head.dtype)
        padded[:vocab] = head[:vocab]
        out["lm_head.weight"] = col(padded)
    return out


@torch.no_grad()
def export_trtllm(load: str | Path, out: str | Path, tp: int = 1, pp: int = 1,
                  dtype: str = "bfloat16", n: int = 2, m: int = 4, progress: bool = True,
                  loaded: tuple | None = None) -> Path:
    """Write ``config.json`` and ``rank{i}.safetensors`` (rank = pp_rank * tp + tp_rank), then
    validate them. Refuses any GEMM weight that is not N:M on some rank. ``loaded``: a
    :func:`load_for_export` result to reuse (several layouts from one load)."""


    if dtype not in TRT_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(TRT_DTYPES)}")
    require_separate(out, load)
    model, cfg, mode, pattern, _, _ = loaded or load_for_export(load, n, m)
    check_layout(cfg, tp, pp, pattern)
    if mode == "dense":
        raise ExportError(f"{load} holds no masks: its weights are not {pattern} sparse "
                          "(prune or learn masks first)")
    state = masked_state(model)
    config = trtllm_config(cfg, tp, pp, dtype, pattern)
    with atomic_directory(out) as tmp:
        distributed.on_rank0(lambda: _write_trtllm(state, cfg, config, tmp, tp, pp, dtype,
                                                   pattern, progress))
    return Path(out)


def _write_trtllm(state: dict, cfg: ModelConfig, config: dict, tmp: Path, tp: int, pp: int,
                  dtype: str, pattern: NMPattern, progress: bool) -> None:
    """The TensorRT-LLM rank files and config from full masked tensors, on one rank, into the
    output's temporary directory."""
    for rank in tqdm(range(tp * pp), desc="trtllm ranks", disable=not progress):
        pp_rank, tp_rank = divmod(rank, tp)
        tensors = _rank_tensors(state, cfg, tp, pp, tp_rank, pp_rank)
        for name, tensor in tensors.items():
            if name.endswith(SPARSE_SUFFIXES) and (
                    tensor.shape[-1] % pattern.m or not is_nm_sparse(tensor, pattern)):
                raise ExportError(f"rank {rank} (tp {tp_rank}, pp {pp_rank}): {name} is not "
                                  f"{pattern} along its input dimension; export a pruned, "
                                  "trimmed or mask-learned checkpoint with its own --N/--M")
        save_file({k: v.to(TRT_DTYPES[dtype]).contiguous() for k, v in tensors.items()},
                  str(tmp / f"rank{rank}.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    seal(tmp)
    report = validate_trtllm(tmp, pattern.n, pattern.m)
    if not report.ok:  # our writer broke its own format: a bug, not the user's input
        raise RuntimeError("the exported checkpoint fails validation:\n" + format_report(report))


# ----------------------------------------------------------------------------- Hugging Face


MASKS_FILE = "nm_masks.safetensors"


@torch.no_grad()
def export_hf(load: str | Path, out: str | Path, n: int = 2, m: int = 4,
              progress: bool = True) -> Path:
    """A Hugging Face directory with masked weights (zeros in place), ``config.json`` recording
    the pattern, and ``nm_masks.safetensors``: each sparse weight's mask packed at
    :func:`nm.bits_per_weight` bits per weight (0.667 for 2:4)."""
    require_separate(out, load)
    model, cfg, mode, pattern, config_dir, _ = load_for_export(load, n, m)
    if mode == "dense":
        raise ExportError(f"{load} holds no masks (a dense checkpoint): its weights are not "
                          f"{pattern} sparse (prune or learn masks first)")
    if (config_dir / HF_CONFIG).exists():
        hf = read_json(config_dir / HF_CONFIG)
    else:
        hf = hf_config_from_model_config(cfg)
    state = masked_state(model)
    masks = dict(state)
    for name, layer in sparse_layers(model):
        masks[f"{name}.weight"] = (layer.masked_weight(torch.ones_like(layer.weight)) != 0)
    mapping = TensorMapping(architecture(hf), hf, cfg)
    with atomic_directory(out) as tmp:
        distributed.on_rank0(lambda: _write_hf_export(
            state, masks, mapping, hf, pattern, config_dir, tmp, progress))
    return Path(out)


def _write_hf_export(state, masks, mapping, hf, pattern, config_dir, tmp, progress) -> None:
    """The HF directory and its packed masks, on one rank, into the output's temporary
    directory."""
    mcore_to_hf(config_dir, tmp, progress=progress, _state=state)
    packed, meta = {}, {}
    for hf_name, mask in mapping.to_hf(masks.__getitem__):
        if mask.dtype != torch.bool:
            continue  # not a sparse weight
        transposed = architecture(hf) == "gpt2"  # Conv1D stores [in, out]
        rows_first = mask.t() if transposed else mask
        if rows_first.shape[-1] % pattern.m:
            raise ExportError(f"{hf_name}: input dimension not a multiple of {pattern.m}")
        indices = mask_to_indices(rows_first, pattern)
        packed[hf_name] = torch.from_numpy(pack_indices(indices, pattern.num_candidates))
        meta[hf_name] = {"shape": list(mask.shape), "transposed": transposed}
    save_file(packed, str(tmp / MASKS_FILE), metadata={
        "pattern": str(pattern), "layout": json.dumps(meta),
        "format": "candidate indices (lexicographic N:M candidates), mixed-radix packed"})
    hf_out = json.loads((tmp / "config.json").read_text())
    weights = sum(math.prod(v["shape"]) for v in meta.values())
    hf_out["sparsity"] = {"pattern": str(pattern), "axis": "input", "masks_file": MASKS_FILE,
                          "bits_per_weight": 8 * sum(t.numel() for t in packed.values())
                          / max(1, weights)}
    (tmp / "config.json").write_text(json.dumps(hf_out, indent=1))
    seal(tmp)  # adds the masks and the rewritten config.json


def load_packed_masks(directory: str | Path) -> dict[str, torch.Tensor]:
    """HF parameter name -> boolean mask (True = kept), from ``nm_masks.safetensors``: in an
    ``export hf`` directory, or the file itself (``import-masks`` takes either)."""
    path = Path(directory)
    if path.is_file():
        directory = path.parent
    else:
        path = path / MASKS_FILE
    verify(directory, names=(path.name,))
    masks = {}
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            pattern = NMPattern.parse(meta["pattern"])
            layout = json.loads(meta["layout"])
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                info = layout[name]
                shape = info["shape"][::-1] if info["transposed"] else info["shape"]
                count = shape[0] * shape[1] // pattern.m
                indices = unpack_indices(f.get_tensor(name).numpy(), pattern.num_candidates,
                                         count)
                mask = indices_to_mask(indices.reshape(shape[0], shape[1] // pattern.m), pattern)
                masks[name] = (mask.t() if info["transposed"] else mask).bool()
    except (SafetensorError, KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: not a packed mask file ({type(err).__name__}: {err}); "
                              "export the model again with `maskllm export hf`") from None
    return masks


@torch.no_grad()
def apply_packed_masks(model: torch.nn.Module, directory: str | Path) -> int:
    """Multiply an HF model's weights by the packed masks in ``directory`` (for a dense copy of
    the weights, or to re-impose the pattern after fine-tuning). Returns how many it masked."""
    params = dict(model.named_parameters())
    masks = load_packed_masks(directory)
    for name, mask in masks.items():
        if name not in params:
            raise InputError(f"the model has no parameter {name} for a packed mask in "
                             f"{directory}: load the model this export was made from")
        if tuple(params[name].shape) != tuple(mask.shape):
            raise InputError(f"{name}: mask shape {list(mask.shape)} != parameter shape "
                             f"{list(params[name].shape)}")
        params[name].mul_(mask.to(params[name].dtype))
    return len(masks)
