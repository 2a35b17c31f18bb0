"""A TensorRT-LLM 2:4 checkpoint validator in plain Python (json, struct, numpy): no TensorRT,
no GPU, no torch.

It reads each ``rank{i}.safetensors`` header itself (8-byte little-endian length, JSON header,
data) and checks what TensorRT-LLM's loader and TensorRT's sparse tactics need: files and
config values, the expected tensor names and per-rank shapes for ``GPTForCausalLM`` (GPT-3
style and Nemotron), ``LlamaForCausalLM`` (LLaMA, Mistral) and ``QWenForCausalLM`` (Qwen2/2.5
with q/k/v biases, Qwen3 with per-head q/k RMSNorm), dtypes, replicated tensors identical across TP
ranks, padded vocabulary rows zero, and at most N non-zeros in every aligned group of M along
the input (last) axis of every GEMM weight. :func:`validate_trtllm` returns the violations and
the warnings; ``maskllm validate trtllm DIR`` exits 2 (a user error) when there are violations.

Each rule is one ``check_*`` function that returns its findings (a list of violations, or a
:class:`Report` where a rule also warns or measures); :func:`validate_trtllm` runs them in the
order of the reference's section 6, stopping where later rules would only repeat an error.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maskllm_megatron.checkpoint.integrity import verify
from maskllm_megatron.errors import CheckpointError

ARCHITECTURES = ("GPTForCausalLM", "NemotronForCausalLM", "LlamaForCausalLM", "QWenForCausalLM")
QWEN_TYPES = ("qwen2", "qwen3")  # dense QWenForCausalLM variants (qwen_type)
DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
POSITION_TYPES = ("learned_absolute", "rope_gptj", "rope_gpt_neox", "long_rope", "alibi",
                  "alibi_with_scale", "relative", "chatglm", "yarn", "mrope", "deferred")
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

    def add(self, findings: Report | list[str]) -> None:
        """Append a check's findings: a Report, or a plain list of violations."""
        if isinstance(findings, Report):
            self.violations += findings.violations
            self.warnings += findings.warnings
            self.density.update(findings.density)
        else:
            self.violations += findings


class SafetensorsFile:
    """Header and raw bytes of one safetensors file (parsed by hand)."""

    def __init__(self, path: Path):
        raw = path.read_bytes()
        if len(raw) < 8:
            raise ValueError(f"{path.name}: too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw[:8])
        if 8 + length > len(raw):
            raise ValueError(f"{path.name}: header length {length} runs past the file")
        try:
            header = json.loads(raw[8:8 + length])
        except ValueError as err:  # JSON and Unicode errors
            raise ValueError(f"{path.name}: the header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path.name}: the header is a JSON {type(header).__name__}, not "
                             "an object")
        header.pop("__metadata__", None)
        self.data = memoryview(raw)[8 + length:]
        self.tensors: dict[str, dict] = header
        for name, info in header.items():
            if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                    and _ints(info.get("shape")) and _ints(info.get("data_offsets"))
                    and len(info["data_offsets"]) == 2):
                raise ValueError(f"{path.name}: header entry {name} lacks a dtype, an integer "
                                 "shape or two data_offsets")
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


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)


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
    arch = cfg["architecture"]
    llama, qwen = arch == "LlamaForCausalLM", arch == "QWenForCausalLM"
    # biases as each model class builds them, with TensorRT-LLM's defaults: LLaMA's attn_bias
    # covers qkv and dense, Qwen's qkv only (dense_bias=False) and defaults to true
    if qwen:
        qkv_bias, dense_bias = bool(cfg.get("attn_bias", True)), False
        mlp_bias = bool(cfg.get("mlp_bias", False))
    elif llama:
        qkv_bias = dense_bias = bool(cfg.get("attn_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
    else:
        qkv_bias = dense_bias = mlp_bias = bool(cfg.get("bias", True))
    gated = llama or qwen or cfg.get("hidden_act") in ("swiglu", "geglu")
    norm_bias = not (llama or qwen)
    qk_norm = qwen and cfg.get("qwen_type") == "qwen3"  # QWen decides by qwen_type alone
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
        if qk_norm:
            out[p + "attention.q_layernorm.weight"] = (d,)
            out[p + "attention.k_layernorm.weight"] = (d,)
        if qkv_bias:
            out[p + "attention.qkv.bias"] = (qkv_rows,)
        if dense_bias:
            out[p + "attention.dense.bias"] = (h,)
        if mlp_bias:
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


# ----------------------------------------------------------------------------- config.json


def check_architecture_and_dtype(cfg: dict) -> list[str]:
    """The two values every later rule depends on; the first one wrong is reported alone."""
    if cfg.get("architecture") not in ARCHITECTURES:
        return [f"architecture {cfg.get('architecture')!r} not in {ARCHITECTURES}"]
    if cfg.get("dtype") not in DTYPES:
        return [f"dtype {cfg.get('dtype')!r} not in {tuple(DTYPES)}"]
    return []


def check_config_values(cfg: dict) -> list[str]:
    """Enum values TensorRT-LLM parses: position embedding type, activation, qwen_type."""
    out = []
    if cfg.get("position_embedding_type", "learned_absolute") not in POSITION_TYPES:
        out.append(f"position_embedding_type {cfg.get('position_embedding_type')!r} is not a "
                   "TensorRT-LLM enum name")
    arch = cfg["architecture"]
    gated = arch in ("LlamaForCausalLM", "QWenForCausalLM")
    act = cfg.get("hidden_act", "gelu")
    if gated and act != "silu":
        out.append(f"hidden_act {act!r}: {arch} uses silu (gated)")
    if arch == "QWenForCausalLM" and cfg.get("qwen_type") not in QWEN_TYPES:
        out.append(f"qwen_type {cfg.get('qwen_type')!r}: QWenForCausalLM needs one of "
                   f"{QWEN_TYPES} (the dense models this validator checks)")
    if not gated and act not in GPT_ACTS:
        out.append(f"hidden_act {act!r} is not one GPTForCausalLM knows")
    return out


def check_config_fields(cfg: dict) -> list[str]:
    """The nested dicts hold only keys TensorRT-LLM's constructors accept."""
    out = []
    for key, allowed in MINIMAL.items():
        extra = set(cfg.get(key) or {}) - allowed
        if extra:
            out.append(f"{key} has keys {sorted(extra)} beyond {sorted(allowed)} (TensorRT-LLM "
                       "raises TypeError on unknown keys)")
    return out


def parallel_sizes(cfg: dict) -> tuple[int, int]:
    """``(tp, pp)`` from ``mapping`` (1 where absent)."""
    mapping = cfg.get("mapping") or {}
    return mapping.get("tp_size", 1), mapping.get("pp_size", 1)


def check_world_size(cfg: dict) -> list[str]:
    tp, pp = parallel_sizes(cfg)
    world = (cfg.get("mapping") or {}).get("world_size", tp * pp)
    return [] if world == tp * pp else [f"mapping.world_size {world} != tp_size x pp_size "
                                        f"{tp * pp}"]


def check_layout_divides(cfg: dict) -> list[str]:
    """TP divides heads and the intermediate size (KV heads: or is a multiple), PP layers."""
    tp, pp = parallel_sizes(cfg)
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    layers, f = cfg["num_hidden_layers"], cfg.get("intermediate_size") or 4 * cfg["hidden_size"]
    rules = ((nh % tp == 0, f"heads {nh} % tp {tp}"),
             (nh % nkv == 0, f"heads {nh} % kv heads {nkv}"),
             (nkv % tp == 0 or tp % nkv == 0, f"kv heads {nkv} vs tp {tp}"),
             (layers % pp == 0, f"layers {layers} % pp {pp}"),
             (f % tp == 0, f"intermediate {f} % tp {tp}"))
    return [f"{what} does not divide" for ok, what in rules if not ok]


def check_embedding_sharding(cfg: dict) -> list[str]:
    if cfg.get("use_parallel_embedding") and cfg.get("embedding_sharding_dim", 0) not in (0, 1):
        return ["embedding_sharding_dim must be 0 or 1"]
    return []


def check_rotary_dim(cfg: dict) -> list[str]:
    """``rotary_embedding_dim`` agrees with head size x ``rotary_pct``."""
    head = cfg.get("head_size") or cfg["hidden_size"] // cfg["num_attention_heads"]
    wanted = int(head * cfg.get("rotary_pct", 1.0))
    if "rotary_embedding_dim" in cfg and cfg["rotary_embedding_dim"] != wanted:
        return [f"rotary_embedding_dim {cfg['rotary_embedding_dim']} != int(head_size x "
                f"rotary_pct) = {wanted}"]
    return []


# ----------------------------------------------------------------------------- rank files


def check_rank_files_present(directory: Path, world: int) -> list[str]:
    """Exactly ``rank0 .. rank{world-1}.safetensors``."""
    found = sorted(p.name for p in directory.glob("rank*.safetensors"))
    wanted = [f"rank{i}.safetensors" for i in range(world)]
    return [] if found == wanted else [f"rank files {found} != {wanted}"]


def read_rank_files(directory: Path, world: int) -> tuple[dict[int, SafetensorsFile], list[str]]:
    """Every rank file parsed, and the violations of those whose header or offsets are bad."""
    files: dict[int, SafetensorsFile] = {}
    bad = []
    for i in range(world):
        try:
            files[i] = SafetensorsFile(directory / f"rank{i}.safetensors")
        except ValueError as err:  # the header or offsets (messages name the file)
            bad.append(str(err))
        except OSError as err:
            bad.append(f"rank{i}.safetensors: {err.strerror or err}")
    return files, bad


def check_tensor_names(where: str, expected: dict, names: set[str]) -> list[str]:
    return ([f"{where}: missing tensor {name}" for name in sorted(set(expected) - names)]
            + [f"{where}: unexpected tensor {name}" for name in sorted(names - set(expected))])


def check_tensor_shape(where: str, name: str, info: dict, expected: tuple[int, ...]) -> list[str]:
    if tuple(info["shape"]) != expected:
        return [f"{where}: {name} has shape {info['shape']}, expected {list(expected)}"]
    return []


def check_tensor_dtype(where: str, name: str, info: dict, dtype: str) -> list[str]:
    """Every tensor in the config's dtype."""
    if info["dtype"] != DTYPES[dtype]:
        return [f"{where}: {name} is {info['dtype']}, config dtype is {dtype} ({DTYPES[dtype]})"]
    return []


def check_tensor_dims(where: str, name: str, info: dict) -> list[str]:
    if len(info["shape"]) not in (1, 2):
        return [f"{where}: {name} is {len(info['shape'])}-D"]
    return []


def check_nm_pattern(where: str, name: str, nonzero: np.ndarray, n: int, m: int) -> Report:
    """At most N non-zeros in every aligned group of M along the input axis; all-zero rows
    are a warning (legal, but a sign of a broken mask)."""
    rows, k = nonzero.shape
    if k % m:
        return Report([f"{where}: {name} input dim {k} is not a multiple of {m}"])
    report = Report()
    counts = nonzero.reshape(rows, k // m, m).sum(-1)
    if (counts > n).any():
        r, g = np.argwhere(counts > n)[0]
        report.violations.append(f"{where}: {name} is not {n}:{m}: row {r}, columns "
                                 f"{g * m}..{g * m + m - 1} hold {counts[r, g]} non-zeros "
                                 f"({int((counts > n).sum())} such groups)")
    if (counts == 0).all(-1).any():
        report.warnings.append(f"{where}: {name} has all-zero rows")
    return report


def check_alignment(where: str, name: str, shape: tuple[int, int]) -> list[str]:
    """Warnings: sparse GEMM shapes ModelOpt/ASP do not handle."""
    rows, k = shape
    if k % 16 or rows % 8:
        return [f"{where}: {name} [{rows}, {k}] is not aligned to N % 8, K % 16 (ModelOpt/ASP "
                "limits)"]
    return []


def check_padded_vocab_rows(where: str, name: str, bits: np.ndarray, tp_rank: int,
                            vocab: int) -> list[str]:
    """Vocabulary rows past ``vocab`` (TP padding) are zero."""
    rows = bits.shape[0]
    real = max(0, min(rows, vocab - tp_rank * rows))
    if real < rows and _nonzero(bits[real:]).any():
        return [f"{where}: {name} has non-zero padded vocabulary rows"]
    return []


def check_rank_tensors(cfg: dict, file: SafetensorsFile, rank: int, n: int,
                       m: int) -> tuple[Report, int, int]:
    """Every rule on one rank's tensors, in the order a reader fixes them: names, shapes,
    dtypes, the N:M pattern (with the densities), padded vocabulary rows. Returns the findings
    and the non-zero and total counts of the sparse GEMM weights."""
    tp, _ = parallel_sizes(cfg)
    pp_rank, tp_rank = divmod(rank, tp)
    where = f"rank{rank}"
    expected = expected_tensors(cfg, tp_rank, pp_rank)
    report = Report()
    report.add(check_tensor_names(where, expected, set(file.tensors)))
    nonzero = total = 0
    for name in sorted(set(file.tensors) & set(expected)):
        info = file.tensors[name]
        problems = (check_tensor_shape(where, name, info, expected[name])
                    or check_tensor_dtype(where, name, info, cfg["dtype"]))
        if problems:  # a wrong shape or dtype makes the value checks meaningless
            report.add(problems)
            continue
        report.add(check_tensor_dims(where, name, info))
        if name.endswith(SPARSE_SUFFIXES):
            nz = _nonzero(file.bits(name))
            pattern = check_nm_pattern(where, name, nz, n, m)
            report.add(pattern)
            if nz.shape[1] % m:
                continue
            nonzero += int(nz.sum())
            total += nz.size
            report.density[f"{where}:{name}"] = float(nz.mean())
            report.warnings += check_alignment(where, name, nz.shape)
        elif name == "lm_head.weight":
            report.density[f"{where}:lm_head.weight (dense, optional)"] = float(
                _nonzero(file.bits(name)).mean())
        if name == "lm_head.weight" or (name == "transformer.vocab_embedding.weight"
                                        and cfg.get("use_parallel_embedding")):
            report.add(check_padded_vocab_rows(where, name, file.bits(name), tp_rank,
                                               cfg["vocab_size"]))
    return report, nonzero, total


def check_replicated_identical(files: dict[int, SafetensorsFile], tp: int,
                               pp: int) -> list[str]:
    """Tensors every TP rank holds whole (norms, row-parallel biases, embeddings) are
    byte-identical across the TP ranks of a stage."""
    out = []
    for pp_rank in range(pp):
        first = files[pp_rank * tp]
        for name in first.tensors:
            if not _replicated(name):
                continue
            for tp_rank in range(1, tp):
                if files[pp_rank * tp + tp_rank].raw(name) != first.raw(name):
                    out.append(f"rank{pp_rank * tp + tp_rank}: replicated {name} differs from "
                               f"rank{pp_rank * tp}")
    return out


def check_build_recipe(cfg: dict) -> Report:
    """What keeps TensorRT from using sparse tactics: fp16 (a warning), quantised GEMMs."""
    report = Report()
    if cfg["dtype"] == "float16":
        report.warnings.append("fp16: TensorRT-LLM casts fp16 GEMM inputs to fp32 by default; "
                               "sparse tactics are certain only in bf16")
    quant = (cfg.get("quantization") or {}).get("quant_algo")
    if quant:
        report.violations.append(f"quant_algo {quant}: weight-only and NVFP4 GEMMs run as "
                                 "plugins, which ignore weight sparsity")
    return report


def validate_trtllm(directory: str | Path, n: int = 2, m: int = 4) -> Report:
    """Every check of the reference's section 6 that needs no GPU, after the files' checksums
    (``checksums.json``, written by the exporter): a damaged or edited file is a violation."""
    directory = Path(directory)
    try:
        verify(directory)
    except CheckpointError as err:
        report = Report([str(err)])
        try:  # the rules' findings too, where the damaged file still parses
            report.add(check_files(directory, n, m))
        except Exception:  # noqa: BLE001, S110 - a damaged file may break a rule; reported above
            pass
        return report
    return check_files(directory, n, m)


def check_files(directory: Path, n: int = 2, m: int = 4) -> Report:
    """The rules of the reference's section 6, on the files as they are."""
    report = Report()
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        report.add([f"config.json: {err}"])
        return report
    report.add(check_architecture_and_dtype(cfg))
    if report.violations:
        return report
    for check in (check_config_values, check_config_fields, check_world_size,
                  check_layout_divides, check_embedding_sharding, check_rotary_dim):
        report.add(check(cfg))
    if report.violations:
        return report
    tp, pp = parallel_sizes(cfg)
    cfg = {**cfg, "mapping": {"tp_size": tp, "pp_size": pp, "world_size": tp * pp}}
    report.add(check_rank_files_present(directory, tp * pp))
    if report.violations:
        return report
    files, unreadable = read_rank_files(directory, tp * pp)
    report.add(unreadable)
    if report.violations:
        return report
    nonzero = total = 0
    for rank, file in files.items():
        findings, rank_nonzero, rank_total = check_rank_tensors(cfg, file, rank, n, m)
        report.add(findings)
        nonzero += rank_nonzero
        total += rank_total
    if report.violations:
        return report
    report.add(check_replicated_identical(files, tp, pp))
    report.add(check_build_recipe(cfg))
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
