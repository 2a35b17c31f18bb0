"""A TensorRT-LLM 2:4 checkpoint validator in plain Python (json, struct, numpy): no TensorRT,
no GPU, no torch.

It reads each ``rank{i}.safetensors`` header itself (8-byte little-endian length, JSON header,
data) and checks what TensorRT-LLM's loader and TensorRT's sparse tactics need: files and
config values, the expected tensor names and per-rank shapes for ``GPTForCausalLM`` (GPT-3
style and Nemotron) and ``LlamaForCausalLM``, dtypes, replicated tensors identical across TP
ranks, padded vocabulary rows zero, and at most N non-zeros in every aligned group of M along
the input (last) axis of every GEMM weight. :func:`validate_trtllm` returns the violations and
the warnings; ``maskllm validate trtllm DIR`` exits non-zero when there are violations.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ARCHITECTURES = ("GPTForCausalLM", "NemotronForCausalLM", "LlamaForCausalLM")
DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
POSITION_TYPES = ("learned_absolute", "rope_gptj", "rope_gpt_neox", "long_rope", "alibi",
                  "alibi_with_scale", "relative", "chatglm", "yarn", "mrope", "deferred")
GATED_ACTS = ("swiglu", "geglu", "silu")  # silu means gated for LLaMA (GatedMLP)
GPT_ACTS = ("gelu", "relu", "squared-relu", "gelu_new", "gelu_pytorch_tanh", "swiglu", "geglu")
MINIMAL = {"mapping": {"world_size", "tp_size", "pp_size"},
           "quantization": {"quant_algo", "kv_cache_quant_algo", "exclude_modules"},
           "moe": {"num_experts", "top_k", "normalization_mode"}}
SPARSE_SUFFIXES = ("attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight",
                   "mlp.gate.weight", "mlp.proj.weight")
_NUMPY = {"F16": np.uint16, "BF16": np.uint16, "F32": np.uint32}


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    density: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


class SafetensorsFile:
    """Header and raw bytes of one safetensors file (parsed by hand)."""

    def __init__(self, path: Path):
        raw = path.read_bytes()
        if len(raw) < 8:
            raise ValueError(f"{path.name}: too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw[:8])
        if 8 + length > len(raw):
            raise ValueError(f"{path.name}: header length {length} runs past the file")
        header = json.loads(raw[8:8 + length])
        header.pop("__metadata__", None)
        self.data = memoryview(raw)[8 + length:]
        self.tensors: dict[str, dict] = header
        spans = sorted((tuple(v["data_offsets"]), k) for k, v in header.items())
        position = 0
        for (start, stop), name in spans:
            if start != position or stop < start or stop > len(self.data):
                raise ValueError(f"{path.name}: offsets of {name} [{start}, {stop}) are not "
                                 f"contiguous and in bounds")
            info = header[name]
            width = {"F16": 2, "BF16": 2, "F32": 4}.get(info["dtype"])
            if width and (stop - start) != width * math.prod(info["shape"]):
                raise ValueError(f"{path.name}: {name} has {stop - start} bytes for shape "
                                 f"{info['shape']}")
            position = stop
        if position != len(self.data):
            raise ValueError(f"{path.name}: {len(self.data) - position} trailing bytes")

    def bits(self, name: str) -> np.ndarray:
        """The tensor as unsigned integers of its width (bit patterns, no float decoding)."""
        info = self.tensors[name]
        start, stop = info["data_offsets"]
        kind = _NUMPY[info["dtype"]]
        return np.frombuffer(self.data[start:stop], dtype=kind).reshape(info["shape"])

    def raw(self, name: str) -> bytes:
        start, stop = self.tensors[name]["data_offsets"]
        return bytes(self.data[start:stop])


def _nonzero(bits: np.ndarray) -> np.ndarray:
    """Non-zero elements from bit patterns: -0.0 counts as zero."""
    sign = 0x7FFF if bits.dtype == np.uint16 else 0x7FFFFFFF
    return (bits & sign) != 0


def expected_tensors(cfg: dict, tp_rank: int, pp_rank: int) -> dict[str, tuple[int, ...]]:
    """Name -> per-rank shape, from the reference's section 2."""
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    d = cfg.get("head_size") or h // nh
    f = cfg.get("intermediate_size") or 4 * h
    vocab, layers = cfg["vocab_size"], cfg["num_hidden_layers"]
    llama = cfg["architecture"] == "LlamaForCausalLM"
    bias = bool(cfg.get("mlp_bias") or cfg.get("attn_bias")) if llama else cfg.get("bias", True)
    gated = llama or cfg.get("hidden_act") in ("swiglu", "geglu")
    norm_bias = not llama
    out: dict[str, tuple[int, ...]] = {}
    if pp_rank == 0:
        if cfg.get("use_parallel_embedding"):
            dim = cfg.get("embedding_sharding_dim", 0)
            shape = (math.ceil(vocab / tp), h) if dim == 0 else (vocab, h // tp)
        else:
            shape = (vocab, h)
        out["transformer.vocab_embedding.weight"] = shape
        if cfg.get("position_embedding_type", "learned_absolute") == "learned_absolute":
            out["transformer.position_embedding.weight"] = (cfg["max_position_embeddings"], h)
    kv_local = (nkv // tp if nkv >= tp else 1) * d
    qkv_rows = nh // tp * d + 2 * kv_local
    for j in range(layers // pp):
        p = f"transformer.layers.{j}."
        for norm in ("input_layernorm", "post_layernorm"):
            out[p + norm + ".weight"] = (h,)
            if norm_bias:
                out[p + norm + ".bias"] = (h,)
        out[p + "attention.qkv.weight"] = (qkv_rows, h)
        out[p + "attention.dense.weight"] = (h, nh * d // tp)
        out[p + "mlp.fc.weight"] = (f // tp, h)
        out[p + "mlp.proj.weight"] = (h, f // tp)
        if gated:
            out[p + "mlp.gate.weight"] = (f // tp, h)
        if bias:
            out[p + "attention.qkv.bias"] = (qkv_rows,)
            out[p + "attention.dense.bias"] = (h,)
            out[p + "mlp.fc.bias"] = (f // tp,)
            out[p + "mlp.proj.bias"] = (h,)
            if gated:
                out[p + "mlp.gate.bias"] = (f // tp,)
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = (h,)
        if norm_bias:
            out["transformer.ln_f.bias"] = (h,)
        out["lm_head.weight"] = (math.ceil(vocab / tp), h)
    return out


def _replicated(name: str) -> bool:
    return ("layernorm" in name or name.startswith("transformer.ln_f")
            or name.endswith(("attention.dense.bias", "mlp.proj.bias"))
            or name in ("transformer.vocab_embedding.weight",
                        "transformer.position_embedding.weight"))


def validate_trtllm(directory: str | Path, n: int = 2, m: int = 4) -> Report:
    """Every check of the reference's section 6 that needs no GPU."""
    directory = Path(directory)
    report = Report()
    bad = report.violations.append
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        bad(f"config.json: {err}")
        return report
    # 2. values
    if cfg.get("architecture") not in ARCHITECTURES:
        bad(f"architecture {cfg.get('architecture')!r} not in {ARCHITECTURES}")
        return report
    dtype = cfg.get("dtype")
    if dtype not in DTYPES:
        bad(f"dtype {dtype!r} not in {tuple(DTYPES)}")
        return report
    if cfg.get("position_embedding_type", "learned_absolute") not in POSITION_TYPES:
        bad(f"position_embedding_type {cfg.get('position_embedding_type')!r} is not a "
            "TensorRT-LLM enum name")
    llama = cfg["architecture"] == "LlamaForCausalLM"
    act = cfg.get("hidden_act", "gelu")
    if llama and act != "silu":
        bad(f"hidden_act {act!r}: LlamaForCausalLM uses silu (gated)")
    if not llama and act not in GPT_ACTS:
        bad(f"hidden_act {act!r} is not one GPTForCausalLM knows")
    # 3. consistency
    for key, allowed in MINIMAL.items():
        extra = set(cfg.get(key) or {}) - allowed
        if extra:
            bad(f"{key} has keys {sorted(extra)} beyond {sorted(allowed)} (TensorRT-LLM "
                "raises TypeError on unknown keys)")
    mapping = cfg.get("mapping") or {}
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    if mapping.get("world_size", tp * pp) != tp * pp:
        bad(f"mapping.world_size {mapping.get('world_size')} != tp_size x pp_size {tp * pp}")
    cfg["mapping"] = {"tp_size": tp, "pp_size": pp, "world_size": tp * pp}
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg[
        "num_attention_heads"]
    layers, f = cfg["num_hidden_layers"], cfg.get("intermediate_size") or 4 * cfg["hidden_size"]
    for ok, what in ((nh % tp == 0, f"heads {nh} % tp {tp}"), (nh % nkv == 0, f"heads {nh} % "
                     f"kv heads {nkv}"), (nkv % tp == 0 or tp % nkv == 0,
                                          f"kv heads {nkv} vs tp {tp}"),
                     (layers % pp == 0, f"layers {layers} % pp {pp}"),
                     (f % tp == 0, f"intermediate {f} % tp {tp}")):
        if not ok:
            bad(f"{what} does not divide")
    if cfg.get("use_parallel_embedding") and cfg.get("embedding_sharding_dim", 0) not in (0, 1):
        bad("embedding_sharding_dim must be 0 or 1")
    head = cfg.get("head_size") or cfg["hidden_size"] // nh
    if "rotary_embedding_dim" in cfg and \
            cfg["rotary_embedding_dim"] != int(head * cfg.get("rotary_pct", 1.0)):
        bad(f"rotary_embedding_dim {cfg['rotary_embedding_dim']} != int(head_size x "
            f"rotary_pct) = {int(head * cfg.get('rotary_pct', 1.0))}")
    if report.violations:
        return report
    # 1. files
    world = tp * pp
    found = sorted(p.name for p in directory.glob("rank*.safetensors"))
    wanted = [f"rank{i}.safetensors" for i in range(world)]
    if found != wanted:
        bad(f"rank files {found} != {wanted}")
        return report
    files: dict[int, SafetensorsFile] = {}
    for i in range(world):
        try:
            files[i] = SafetensorsFile(directory / f"rank{i}.safetensors")
        except (ValueError, json.JSONDecodeError) as err:
            bad(str(err))
    if report.violations:
        return report
    st_dtype = DTYPES[dtype]
    nonzero = total = 0
    for rank, file in files.items():
        pp_rank, tp_rank = divmod(rank, tp)
        where = f"rank{rank}"
        expected = expected_tensors(cfg, tp_rank, pp_rank)
        names = set(file.tensors)
        # 4. name sets
        for name in sorted(set(expected) - names):
            bad(f"{where}: missing tensor {name}")
        for name in sorted(names - set(expected)):
            bad(f"{where}: unexpected tensor {name}")
        for name in sorted(names & set(expected)):
            info = file.tensors[name]
            # 5. shapes, 6. dtypes
            if tuple(info["shape"]) != expected[name]:
                bad(f"{where}: {name} has shape {info['shape']}, expected "
                    f"{list(expected[name])}")
                continue
            if info["dtype"] != st_dtype:
                bad(f"{where}: {name} is {info['dtype']}, config dtype is {dtype} ({st_dtype})")
                continue
            if len(info["shape"]) not in (1, 2):
                bad(f"{where}: {name} is {len(info['shape'])}-D")
            # 8. the N:M pattern along the input axis
            if name.endswith(SPARSE_SUFFIXES) or name == "lm_head.weight":
                rows, k = info["shape"]
                nz = _nonzero(file.bits(name))
                if name.endswith(SPARSE_SUFFIXES):
                    if k % m:
                        bad(f"{where}: {name} input dim {k} is not a multiple of {m}")
                        continue
                    counts = nz.reshape(rows, k // m, m).sum(-1)
                    if (counts > n).any():
                        r, g = np.argwhere(counts > n)[0]
                        bad(f"{where}: {name} is not {n}:{m}: row {r}, columns "
                            f"{g * m}..{g * m + m - 1} hold {counts[r, g]} non-zeros "
                            f"({int((counts > n).sum())} such groups)")
                    if (counts == 0).all(-1).any():
                        report.warnings.append(f"{where}: {name} has all-zero rows")
                    nonzero += int(nz.sum())
                    total += nz.size
                    report.density[f"{where}:{name}"] = float(nz.mean())
                    # 9. alignment
                    if k % 16 or rows % 8:
                        report.warnings.append(f"{where}: {name} [{rows}, {k}] is not aligned "
                                               "to N % 8, K % 16 (ModelOpt/ASP limits)")
                else:
                    report.density[f"{where}:lm_head.weight (dense, optional)"] = float(nz.mean())
            if name == "lm_head.weight" or (name == "transformer.vocab_embedding.weight"
                                            and cfg.get("use_parallel_embedding")):
                rows = info["shape"][0]
                first = tp_rank * rows
                real = max(0, min(rows, cfg["vocab_size"] - first))
                if real < rows and _nonzero(file.bits(name)[real:]).any():
                    bad(f"{where}: {name} has non-zero padded vocabulary rows")
    if report.violations:
        return report
    # 7. replicated tensors identical across the TP ranks of a stage
    for pp_rank in range(pp):
        first = files[pp_rank * tp]
        for name in first.tensors:
            if not _replicated(name):
                continue
            for tp_rank in range(1, tp):
                if files[pp_rank * tp + tp_rank].raw(name) != first.raw(name):
                    bad(f"rank{pp_rank * tp + tp_rank}: replicated {name} differs from "
                        f"rank{pp_rank * tp}")
    # 10. build recipe
    if dtype == "float16":
        report.warnings.append("fp16: TensorRT-LLM casts fp16 GEMM inputs to fp32 by default; "
                               "sparse tactics are certain only in bf16")
    quant = (cfg.get("quantization") or {}).get("quant_algo")
    if quant:
        bad(f"quant_algo {quant}: weight-only and NVFP4 GEMMs run as plugins, which ignore "
            "weight sparsity")
    if total:
        report.density["all sparse GEMM weights"] = nonzero / total
    return report


def format_report(report: Report) -> str:
    lines = [f"VIOLATION: {v}" for v in report.violations]
    lines += [f"warning: {w}" for w in report.warnings]
    if "all sparse GEMM weights" in report.density:
        lines.append(f"density of the sparse GEMM weights: "
                     f"{report.density['all sparse GEMM weights']:.1%}")
    lines.append("valid" if report.ok else f"{len(report.violations)} violation(s)")
    return "\n".join(lines)
