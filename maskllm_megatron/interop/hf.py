"""Hugging Face <-> megatron-core checkpoints for LLaMA, Qwen2/2.5, Qwen3, Mistral, Nemotron and
GPT-2 (GPT-3 style).

``hf-to-mcore`` reads a local Hugging Face directory (config.json, safetensors or a
weights-only ``pytorch_model.bin``), builds megatron-core's GPTModel in one process, fills it one
tensor at a time (each HF tensor is read, permuted and copied, then dropped: the model is held
once), and saves a dist_checkpointing checkpoint, which loads at any TP x PP. Beside it:
``model_config.json`` (what every command reads), the HF ``config.json`` (for the way back) and
the tokenizer. ``mcore-to-hf`` inverts every step. Permutations are exact, so HF -> mcore -> HF
gives bitwise identical tensors.

Every architecture with the ``model.layers.{i}.self_attn`` / ``mlp`` layout is one
:class:`Family` table in :data:`FAMILIES` (Megatron-Bridge style: data, not a copied converter):
its config keys (which turn biases on, the norm's epsilon, a sliding window, keys refused), the
per-layer tensors copied 1:1 and the modules fused into ``linear_qkv`` and ``linear_fc1``.
GPT-2's Conv1D layout is the one special path.

Layout differences handled here:

* QKV: megatron fuses them per query group, ``[q heads of group g; k_g; v_g]`` for each g;
  GPT-2's ``c_attn`` is ``[q; k; v]`` over all heads, transposed (Conv1D).
* SwiGLU: ``linear_fc1`` is ``[gate; up]``.
* Vocabulary: padded with zero rows to a multiple of ``--make-vocab-size-divisible-by`` (128) x
  TP, megatron's rule; the padding is cut off on the way back.
* Tied embeddings: no ``output_layer`` in megatron, no ``lm_head`` in HF.
* Nemotron's LayerNorm1p stores ``gamma - 1`` on both sides (zero-centred gamma).
* Qwen2's q/k/v biases are implied by the architecture (no config key); Qwen3's per-head
  ``q_norm``/``k_norm`` are megatron's ``q_layernorm``/``k_layernorm``; Mistral's
  ``sliding_window`` W is megatron's ``window_size`` (W - 1, 0).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from maskllm_megatron import distributed
from maskllm_megatron.checkpoint.integrity import seal, verify, verify_model_files
from maskllm_megatron.checkpoint.model import load_model, save_model
from maskllm_megatron.checkpoint.run_dir import model_dir
from maskllm_megatron.checkpoint.safe_load import read_json, torch_load_safely
from maskllm_megatron.errors import CheckpointError, InputError
from maskllm_megatron.model.build import build_model
from maskllm_megatron.model.config import ModelConfig, TransformerFields
from maskllm_megatron.paths import atomic_directory, require_path, require_separate

HF_CONFIG = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt")


class ConversionError(InputError):
    """Unsupported architecture, or a config that does not match the weights."""


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture with the ``model.layers.{i}.self_attn.*`` / ``mlp.*`` layout,
    as data: what its config keys mean and where its tensors lie. The converter, ``export hf``
    and ``import-masks`` read these tables (the TensorRT-LLM export reads the model config they
    produce); a new family is a new table, not new code paths."""

    architecture: str  # the HF class in config.json's "architectures"
    model_type: str
    hidden_act: str  # the one HF activation supported, with megatron's name for it
    activation: str
    normalization: str  # RMSNorm, or LayerNorm1p (Nemotron: zero-centred gamma)
    eps_key: str
    # q/k/v biases: a constant, or the HF key that turns them on (for LLaMA and Nemotron that
    # key also puts a bias on o_proj); likewise the MLP's
    qkv_bias: bool | str
    mlp_bias: bool | str
    # per-layer tensors copied as they are: megatron module -> HF module
    layer: dict[str, str]
    fc1: tuple[str, ...]  # HF modules stacked into linear_fc1 ([gate; up] for SwiGLU)
    qk_layernorm: bool = False  # per-head q_norm / k_norm (Qwen3)
    sliding_window: bool = False  # HF ``sliding_window`` W is megatron's window (W - 1, 0)
    partial_rotary: bool = False  # HF ``partial_rotary_factor`` is read (Nemotron)
    # HF keys that turn on what megatron or the exports cannot express: (key, why)
    refuse: tuple[tuple[str, str], ...] = ()

    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


_LAYER = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm",
          "self_attention.linear_proj": "self_attn.o_proj", "mlp.linear_fc2": "mlp.down_proj"}
_QK_NORMS = {"self_attention.q_layernorm": "self_attn.q_norm",
             "self_attention.k_layernorm": "self_attn.k_norm"}
_SWIGLU = ("mlp.gate_proj", "mlp.up_proj")
_QWEN_WINDOW = ("use_sliding_window", "sliding-window attention on some layers (layers from "
                "max_window_layers on) cannot be exported; convert a config with "
                "use_sliding_window false (what Qwen2/2.5/3 checkpoints ship)")
_LLAMA_STYLE = dict(hidden_act="silu", activation="silu", normalization="RMSNorm",
                    eps_key="rms_norm_eps", layer=_LAYER, fc1=_SWIGLU)

FAMILIES = {
    "llama": Family("LlamaForCausalLM", "llama", qkv_bias="attention_bias",
                    mlp_bias="mlp_bias", **_LLAMA_STYLE),
    "nemotron": Family("NemotronForCausalLM", "nemotron", hidden_act="relu2",
                       activation="squared_relu", normalization="LayerNorm1p",
                       eps_key="norm_eps", qkv_bias="attention_bias", mlp_bias="mlp_bias",
                       layer=_LAYER, fc1=("mlp.up_proj",), partial_rotary=True),
    # q/k/v always carry a bias, and no config key says so; o_proj and the MLP have none
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", qkv_bias=True, mlp_bias=False,
                    refuse=(_QWEN_WINDOW,), **_LLAMA_STYLE),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", qkv_bias=False, mlp_bias=False,
                    qk_layernorm=True, refuse=(
                        ("attention_bias", "Qwen3 with q/k/v/o biases has no TensorRT-LLM "
                         "counterpart (QWenForCausalLM's Qwen3 has none); convert a config with "
                         "attention_bias false"), _QWEN_WINDOW),
                    **{**_LLAMA_STYLE, "layer": {**_LAYER, **_QK_NORMS}}),
    "mistral": Family("MistralForCausalLM", "mistral", qkv_bias=False, mlp_bias=False,
                      sliding_window=True, **_LLAMA_STYLE),
}
GPT2 = "GPT2LMHeadModel"
SUPPORTED = {**{f.architecture: name for name, f in FAMILIES.items()}, GPT2: "gpt2"}


# ----------------------------------------------------------------------------- configs


def architecture(hf_config: dict) -> str:
    """Our name of the config's family (a key of :data:`FAMILIES`, or ``gpt2``)."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in SUPPORTED:
            return SUPPORTED[name]
    raise ConversionError(f"unsupported architecture {names or hf_config.get('model_type')}; "
                          f"supported: {', '.join(SUPPORTED)}")


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def _flag(hf: dict, value: bool | str) -> bool:
    return bool(hf.get(value, False)) if isinstance(value, str) else value


def _windowed_layers(hf: dict) -> list[int]:
    """The layers a config gives sliding-window attention by ``layer_types`` (transformers 5)."""
    return [i for i, kind in enumerate(hf.get("layer_types") or []) if kind != "full_attention"]


def _family_transformer(family: Family, hf: dict) -> dict:
    """TransformerConfig fields of a ``model.layers`` family's HF config."""
    arch = family.architecture
    for key, why in family.refuse:
        if hf.get(key):
            raise ConversionError(f"{arch} with {key}: {hf[key]!r} is not supported: {why}")
    windowed = _windowed_layers(hf)
    if windowed and not family.sliding_window:
        raise ConversionError(f"{arch} with sliding-window attention on layers {windowed} "
                              "(layer_types) is not supported; convert a config whose "
                              "layer_types are all full_attention")
    if hf.get("hidden_act") != family.hidden_act:
        raise ConversionError(f"{arch} with hidden_act {hf.get('hidden_act')!r} is not "
                              f"supported ({family.hidden_act} only)")
    qkv_bias, mlp_bias = _flag(hf, family.qkv_bias), _flag(hf, family.mlp_bias)
    if isinstance(family.qkv_bias, str) and qkv_bias != mlp_bias:
        # the HF key biases o_proj too, which megatron ties to the MLP's biases
        raise ConversionError(f"{arch} with {family.qkv_bias} {qkv_bias} but {family.mlp_bias} "
                              f"{mlp_bias} is not supported: megatron biases o_proj only with "
                              "the MLP; both or neither")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    transformer = dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=hf.get("head_dim") or hidden // heads,
        normalization="RMSNorm" if family.normalization == "RMSNorm" else "LayerNorm",
        layernorm_zero_centered_gamma=family.normalization == "LayerNorm1p",
        layernorm_epsilon=float(hf.get(family.eps_key, 1e-6 if family.normalization == "RMSNorm"
                                       else 1e-5)),
        activation=family.activation, gated_linear_unit=len(family.fc1) == 2,
        add_bias_linear=mlp_bias, add_qkv_bias=qkv_bias, qk_layernorm=family.qk_layernorm)
    window = hf.get("sliding_window") if family.sliding_window else None
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ConversionError(f"{arch}: sliding_window must be a positive integer (or null "
                                  f"for none), got {window!r}")
        transformer["window_size"] = [window - 1, 0]  # the query and the W - 1 tokens before
    return transformer


def model_config_from_hf(hf: dict, tp: int = 1, divisible_by: int = 128,
                         tokenizer: str | None = None, dtype: str | None = None) -> ModelConfig:
    """Our ModelConfig (TransformerConfig fields) for an HF config dict."""
    arch = architecture(hf)
    dtype = dtype or {"bfloat16": "bfloat16", "float16": "float16"}.get(
        str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), "float32")
    if arch == "gpt2":
        hidden, heads = hf["n_embd"], hf["n_head"]
        transformer = dict(
            num_layers=hf["n_layer"], hidden_size=hidden, num_attention_heads=heads,
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden, normalization="LayerNorm",
            layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5), activation="gelu_tanh",
            add_bias_linear=True, add_qkv_bias=True)
        position, max_len, tied, rope = "learned_absolute", hf["n_positions"], True, {}
        vocab = hf["vocab_size"]
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConversionError(f"GPT-2 activation {hf['activation_function']!r} is not "
                                  "supported (gelu_new only)")
    else:
        family = FAMILIES[arch]
        # transformers >= 5 nests these under rope_parameters; older configs keep them on top
        rope_params = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (
            rope_params if rope_params.get("rope_type", "default") != "default" else None)
        if scaling:
            raise ConversionError(f"rope scaling {scaling} is not supported")
        theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        partial = float(rope_params.get("partial_rotary_factor",
                                        hf.get("partial_rotary_factor", 1.0)))
        if partial != 1.0 and not family.partial_rotary:
            raise ConversionError(f"{family.architecture} with partial_rotary_factor {partial} "
                                  "is not supported")
        transformer = _family_transformer(family, hf)
        rope = dict(rotary_base=theta, rotary_percent=partial)
        position, max_len = "rope", hf["max_position_embeddings"]
        tied, vocab = bool(hf.get("tie_word_embeddings", False)), hf["vocab_size"]
    transformer["params_dtype"] = dtype
    transformer["init_method_std"] = float(hf.get("initializer_range", 0.02))
    shape = TransformerFields(**transformer)
    check_parallel(shape, tp)
    return ModelConfig(transformer=shape,
                       vocab_size=padded_vocab_size(vocab, tp, divisible_by),
                       max_sequence_length=max_len, position_embedding_type=position,
                       share_embeddings_and_output_weights=tied, tokenizer=tokenizer,
                       true_vocab_size=vocab, **rope)


def hf_config_from_model_config(cfg: ModelConfig) -> dict:
    """An HF config.json for a model that was not converted from HF (e.g. the demo's), when it
    is one of the supported architectures exactly; the inverse of :func:`model_config_from_hf`."""
    t = cfg.transformer
    vocab = cfg.true_vocab_size or cfg.vocab_size
    heads = t.num_attention_heads
    if (t.activation == "gelu_tanh" and cfg.position_embedding_type == "learned_absolute"
            and cfg.share_embeddings_and_output_weights and t.add_bias_linear
            and t.normalization == "LayerNorm" and t.num_query_groups == heads):
        return {"architectures": [GPT2], "model_type": "gpt2",
                "vocab_size": vocab, "n_embd": t.hidden_size, "n_layer": t.num_layers,
                "n_head": heads, "n_positions": cfg.max_sequence_length,
                "n_inner": t.ffn_hidden_size, "activation_function": "gelu_new",
                "layer_norm_epsilon": t.layernorm_epsilon,
                "initializer_range": t.init_method_std, "tie_word_embeddings": True,
                "torch_dtype": t.params_dtype, "bos_token_id": 0, "eos_token_id": 0}
    if (t.gated_linear_unit and t.activation == "silu" and t.normalization == "RMSNorm"
            and cfg.position_embedding_type == "rope" and cfg.rotary_percent == 1.0):
        window = t.window_size
        if t.qk_layernorm and not t.add_qkv_bias and not t.add_bias_linear and not window:
            name = "qwen3"
        elif window and window[1] == 0 and not (t.qk_layernorm or t.add_qkv_bias
                                                 or t.add_bias_linear):
            name = "mistral"
        elif t.add_qkv_bias and not (t.add_bias_linear or t.qk_layernorm or window):
            name = "qwen2"
        elif not (t.qk_layernorm or window):  # megatron's add_bias_linear biases qkv too
            name = "llama"
        else:
            name = None
        if name:
            family = FAMILIES[name]
            hf = {"architectures": [family.architecture], "model_type": family.model_type,
                  "vocab_size": vocab, "hidden_size": t.hidden_size,
                  "intermediate_size": t.ffn_hidden_size,
                  "num_hidden_layers": t.num_layers, "num_attention_heads": heads,
                  "num_key_value_heads": t.num_query_groups, "head_dim": t.kv_channels,
                  family.eps_key: t.layernorm_epsilon, "hidden_act": family.hidden_act,
                  "initializer_range": t.init_method_std, "rope_theta": cfg.rotary_base,
                  "max_position_embeddings": cfg.max_sequence_length,
                  "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
                  "torch_dtype": t.params_dtype}
            for key, value in ((family.qkv_bias, t.add_qkv_bias or t.add_bias_linear),
                               (family.mlp_bias, t.add_bias_linear)):
                if isinstance(key, str):
                    hf[key] = value
            if family.sliding_window:
                hf["sliding_window"] = window[0] + 1
            return hf
    raise ConversionError("this model matches none of the Hugging Face architectures "
                          f"{', '.join(SUPPORTED)} exactly; convert it from HF to export it")


def check_parallel(transformer: TransformerFields, tp: int, pp: int = 1) -> None:
    """TP must divide heads and KV groups, PP the layers: checked before any work."""
    heads, groups = transformer.num_attention_heads, transformer.num_query_groups
    if tp < 1 or heads % tp or groups % tp:
        raise ConversionError(f"--tp {tp} must divide the {heads} attention heads and the "
                              f"{groups} key-value groups")
    if pp < 1 or transformer.num_layers % pp:
        raise ConversionError(f"--pp {pp} must divide the {transformer.num_layers} layers")


# ----------------------------------------------------------------------------- tensor maps


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 groups: int) -> torch.Tensor:
    """[q; k; v] (rows = heads x head_dim) -> megatron's per-group [q_g; k_g; v_g]."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)
    k = k.reshape(groups, -1, *rest)
    v = v.reshape(groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_mcore(qkv: torch.Tensor, groups: int, q_rows: int,
                   kv_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's per-group [q_g; k_g; v_g] -> (q, k, v); the inverse of
    :func:`qkv_to_mcore`, shared with the TensorRT-LLM export."""
    rest = qkv.shape[1:]
    per = qkv.reshape(groups, -1, *rest)
    qg, kg = q_rows // groups, kv_rows // groups
    q, k, v = per[:, :qg], per[:, qg:qg + kg], per[:, qg + kg:]
    return (q.reshape(q_rows, *rest), k.reshape(kv_rows, *rest), v.reshape(kv_rows, *rest))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class TensorMapping:
    """Name mapping for one architecture: ``to_mcore`` yields (mcore name, tensor) from a
    reader of HF tensors; ``to_hf`` yields (hf name, tensor) from a reader of mcore tensors.
    GPT-2 has its own layout; every other family is its :class:`Family` table."""

    def __init__(self, arch: str, hf: dict, cfg: ModelConfig):
        self.arch, self.hf, self.cfg = arch, hf, cfg
        self.family = FAMILIES.get(arch)
        t = cfg.transformer
        self.layers = t.num_layers
        self.groups = t.num_query_groups
        self.head_dim = t.kv_channels
        self.q_rows = t.num_attention_heads * self.head_dim
        self.kv_rows = self.groups * self.head_dim
        self.vocab = hf["vocab_size"]
        self.tied = cfg.share_embeddings_and_output_weights
        self.biases = t.add_bias_linear
        self.qkv_bias = t.add_qkv_bias or t.add_bias_linear  # megatron's rule for linear_qkv

    @staticmethod
    def _suffixes(bias: bool) -> tuple[str, ...]:
        return ("weight", "bias") if bias else ("weight",)

    def _norm_suffixes(self) -> tuple[str, ...]:
        return ("weight",) if self.cfg.transformer.normalization == "RMSNorm" \
            else ("weight", "bias")

    def _copied(self, i: int, linear: bool):
        """(mcore name, HF name) of the norms (``linear`` False) or the linears a layer copies
        as they are."""
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for ours, theirs in self.family.layer.items():
            if ours.startswith(("self_attention.linear", "mlp.linear")) != linear:
                continue
            for s in self._suffixes(self.biases) if linear else self._norm_suffixes():
                yield f"{m}{ours}.{s}", f"{p}{theirs}.{s}"

    def _embed_names(self) -> tuple[str, str | None, str, str]:
        if self.arch == "gpt2":
            return "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f", \
                "lm_head.weight"
        return "model.embed_tokens.weight", None, "model.norm", "lm_head.weight"

    @staticmethod
    def _gpt2_layer(i: int) -> dict[str, str]:
        p = f"transformer.h.{i}."
        return {"ln1": p + "ln_1", "ln2": p + "ln_2", "qkv": p + "attn.c_attn",
                "proj": p + "attn.c_proj", "fc1": p + "mlp.c_fc", "fc2": p + "mlp.c_proj"}

    def to_mcore(self, get):
        """``get(hf_name)`` -> tensor. Yields (mcore state-dict name, tensor)."""
        vocab_rows = self.cfg.vocab_size
        wte, wpe, final_norm, head = self._embed_names()
        yield "embedding.word_embeddings.weight", _pad_rows(get(wte), vocab_rows)
        if wpe:
            yield "embedding.position_embeddings.weight", get(wpe)
        for i in range(self.layers):
            m = f"decoder.layers.{i}."
            if self.arch == "gpt2":
                yield from self._gpt2_to_mcore(get, i)
                continue
            for ours, theirs in self._copied(i, linear=False):
                yield ours, get(theirs)
            p = f"model.layers.{i}."
            for s in self._suffixes(self.qkv_bias):
                yield m + f"self_attention.linear_qkv.{s}", qkv_to_mcore(
                    *(get(f"{p}{name}.{s}") for name in self.family.qkv), self.groups)
            for s in self._suffixes(self.biases):  # [gate; up] for SwiGLU
                yield m + f"mlp.linear_fc1.{s}", torch.cat(
                    [get(f"{p}{name}.{s}") for name in self.family.fc1])
            for ours, theirs in self._copied(i, linear=True):
                yield ours, get(theirs)
        for s in self._norm_suffixes():
            yield f"decoder.final_layernorm.{s}", get(f"{final_norm}.{s}")
        if not self.tied:
            yield "output_layer.weight", _pad_rows(get(head), vocab_rows)

    def _gpt2_to_mcore(self, get, i: int):
        n, m = self._gpt2_layer(i), f"decoder.layers.{i}."
        for s in self._norm_suffixes():
            yield m + f"input_layernorm.{s}", get(f"{n['ln1']}.{s}")
            yield m + f"pre_mlp_layernorm.{s}", get(f"{n['ln2']}.{s}")
        w = get(n["qkv"] + ".weight").t()  # Conv1D: [in, out]
        q, k, v = w.split([self.q_rows, self.kv_rows, self.kv_rows])
        yield m + "self_attention.linear_qkv.weight", qkv_to_mcore(q, k, v, self.groups)
        b = get(n["qkv"] + ".bias")
        q, k, v = b.split([self.q_rows, self.kv_rows, self.kv_rows])
        yield m + "self_attention.linear_qkv.bias", qkv_to_mcore(q, k, v, self.groups)
        for ours, theirs in (("self_attention.linear_proj", "proj"),
                             ("mlp.linear_fc1", "fc1"), ("mlp.linear_fc2", "fc2")):
            yield m + ours + ".weight", get(n[theirs] + ".weight").t()
            yield m + ours + ".bias", get(n[theirs] + ".bias")

    def to_hf(self, get):
        """``get(mcore_name)`` -> tensor. Yields (HF name, tensor)."""
        wte, wpe, final_norm, head = self._embed_names()
        yield wte, get("embedding.word_embeddings.weight")[:self.vocab]
        if wpe:
            yield wpe, get("embedding.position_embeddings.weight")
        for i in range(self.layers):
            m = f"decoder.layers.{i}."
            if self.arch == "gpt2":
                yield from self._gpt2_to_hf(get, i)
                continue
            for linear in (False, True):
                for ours, theirs in self._copied(i, linear):
                    yield theirs, get(ours)
            p = f"model.layers.{i}."
            for s in self._suffixes(self.qkv_bias):
                parts = qkv_from_mcore(get(m + f"self_attention.linear_qkv.{s}"), self.groups,
                                       self.q_rows, self.kv_rows)
                for name, t in zip(self.family.qkv, parts, strict=True):
                    yield f"{p}{name}.{s}", t.contiguous()
            for s in self._suffixes(self.biases):
                fc1 = get(m + f"mlp.linear_fc1.{s}")
                parts = fc1.chunk(len(self.family.fc1))
                for name, t in zip(self.family.fc1, parts, strict=True):
                    yield f"{p}{name}.{s}", t.contiguous()
        for s in self._norm_suffixes():
            yield f"{final_norm}.{s}", get(f"decoder.final_layernorm.{s}")
        if not self.tied:
            yield head, get("output_layer.weight")[:self.vocab]

    def _gpt2_to_hf(self, get, i: int):
        n, m = self._gpt2_layer(i), f"decoder.layers.{i}."
        for s in self._norm_suffixes():
            yield f"{n['ln1']}.{s}", get(m + f"input_layernorm.{s}")
            yield f"{n['ln2']}.{s}", get(m + f"pre_mlp_layernorm.{s}")
        for s in ("weight", "bias"):  # c_attn: [q; k; v] over all heads, Conv1D [in, out]
            qkv = torch.cat(qkv_from_mcore(get(m + f"self_attention.linear_qkv.{s}"),
                                           self.groups, self.q_rows, self.kv_rows))
            yield f"{n['qkv']}.{s}", qkv.t().contiguous() if s == "weight" else qkv
        for ours, theirs in (("self_attention.linear_proj", "proj"),
                             ("mlp.linear_fc1", "fc1"), ("mlp.linear_fc2", "fc2")):
            yield n[theirs] + ".weight", get(m + ours + ".weight").t().contiguous()
            yield n[theirs] + ".bias", get(m + ours + ".bias")


# ----------------------------------------------------------------------------- reading HF


class HFReader:
    """Lazy access to the tensors of an HF directory (safetensors, sharded or not, or a
    weights-only ``pytorch_model.bin``); remembers what was read for error messages."""

    def __init__(self, directory: Path, check: bool = True):
        if check:  # the directory's checksums.json, when it has one (our HF exports)
            verify(directory)
        self.files: dict[str, object] = {}
        self.where: dict[str, str] = {}
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            self.where = _weight_map(index)
        elif single.exists():
            with _open_safetensors(single) as f:
                self.where = {name: single.name for name in f.keys()}  # noqa: SIM118
        elif (directory / "pytorch_model.bin").exists():
            file = directory / "pytorch_model.bin"
            self.state = torch_load_safely(file, file, mmap=True)
            if not isinstance(self.state, dict) or not all(
                    isinstance(v, torch.Tensor) for v in self.state.values()):
                raise CheckpointError(f"{file}: not a state dict of tensors; save the model "
                                      "with save_pretrained")
            self.where = {name: "pytorch_model.bin" for name in self.state}
        else:
            raise FileNotFoundError(f"{directory} has no model.safetensors(.index.json) or "
                                    "pytorch_model.bin")
        self.directory = directory
        self.read: list[str] = []
        self.used: set[str] = set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"the checkpoint has no tensor {name!r} (does config.json "
                                  "match the weights?)")
        self.used.add(name)
        file = self.where[name]
        if file == "pytorch_model.bin":
            tensor = self.state[name]
        else:
            path = self.directory / file
            if file not in self.files:
                self.files[file] = _open_safetensors(path)
            try:
                tensor = self.files[file].get_tensor(name)
            except SafetensorError as err:
                raise CheckpointError(f"{path}: cannot read {name} ({err}); the file is "
                                      "truncated or corrupted") from None
        self.read.append(f"{name} {list(tensor.shape)}")
        return tensor

    def unused(self) -> list[str]:
        ignorable = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
        return sorted(n for n in self.where if n not in self.used and not n.endswith(ignorable)
                      and not (n == "lm_head.weight"))


def _weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> file, from a sharded checkpoint's index; files must lie beside it."""
    index_data = read_json(index)
    weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and Path(f).name == f for f in weight_map.values()):
        raise CheckpointError(f"{index}: not a safetensors index (no weight_map of tensor names "
                              "to files in its directory); save the model again")
    return weight_map


def _open_safetensors(path: Path):
    """``safe_open`` (the header is parsed here); a bad file is a CheckpointError naming it."""
    try:
        return safe_open(str(path), "pt")
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); the file is "
                              "truncated or corrupted, save it again") from None


# ----------------------------------------------------------------------------- the commands


def _copy_tokenizer(source: Path, target: Path) -> bool:
    files = [source / f for f in _TOKENIZER_FILES if (source / f).exists()]
    if not files:
        return False
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, target / file.name)
    return True


@torch.no_grad()
def hf_to_mcore(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1,
                divisible_by: int = 128, tokenizer: str | None = None,
                progress: bool = True) -> ModelConfig:
    """Convert an HF directory into a megatron-core checkpoint directory (see module doc)."""
    hf_dir, out = Path(hf_dir), Path(out)
    require_path(hf_dir, "Hugging Face model directory")
    require_separate(out, hf_dir, tokenizer)
    verify(hf_dir, collective=True)  # before config.json is read
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    hf = read_json(hf_dir / "config.json")
    arch = architecture(hf)
    cfg = model_config_from_hf(hf, tp, divisible_by)
    check_parallel(cfg.transformer, tp, pp)
    reader = HFReader(hf_dir, check=False)  # verified above
    distributed.use_layout(1, 1, what="conversion")
    model = build_model(cfg, sparse_layers=(), perform_initialization=False)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    written: set[str] = set()
    mapping = TensorMapping(arch, hf, cfg)
    for name, tensor in tqdm(mapping.to_mcore(reader), total=len(state), desc="hf -> mcore",
                             disable=not progress):
        target = state[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ConversionError(f"{' + '.join(reader.read)} -> {name}: the checkpoint "
                                  f"gives shape {list(tensor.shape)}, the config expects "
                                  f"{list(target.shape)}")
        target.copy_(tensor)
        written.add(name)
        reader.read.clear()
    missing = sorted(set(state) - written)
    if missing:
        raise ConversionError(f"no HF tensor for {missing[:5]}")
    extra = reader.unused()
    if extra:
        raise ConversionError(f"the checkpoint has tensors the config does not use: {extra[:5]} "
                              f"(config says {mapping.layers} layers)")
    with atomic_directory(out) as tmp:
        save_model(model, tmp)

        def describe() -> ModelConfig:
            if tokenizer:
                cfg.tokenizer = str(Path(tokenizer).resolve())
            elif _copy_tokenizer(hf_dir, tmp / TOKENIZER_DIR):
                cfg.tokenizer = TOKENIZER_DIR  # relative: resolved beside model_config.json
            cfg.save(tmp)
            (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=1))
            seal(tmp)
            return cfg

        cfg = distributed.on_rank0(describe)
    return cfg


@torch.no_grad()
def mcore_to_hf(mcore_dir: str | Path, out: str | Path, max_shard_bytes: int = 5 << 30,
                progress: bool = True, _state: dict | None = None) -> Path:
    """Write an HF directory (config.json, safetensors, tokenizer) from a converted checkpoint
    (or a run trained from one: its latest iteration's model). ``_state``: tensors already
    loaded (the HF exporter passes masked weights)."""
    mcore_dir, out = Path(mcore_dir), Path(out)
    require_path(mcore_dir, "megatron-core checkpoint directory")
    if _state is None:
        require_separate(out, mcore_dir)
    source = model_dir(mcore_dir)
    verify_model_files(mcore_dir, source, source.parent)
    config_dir = next((d for d in (mcore_dir, source, source.parent)
                       if (d / HF_CONFIG).exists()), None)
    if config_dir is not None:
        hf = read_json(config_dir / HF_CONFIG)
    else:  # not converted from HF: derive the HF config when the architecture matches
        config_dir = next((d for d in (mcore_dir, source, source.parent)
                           if (d / "model_config.json").exists()), None)
        if config_dir is None:
            raise FileNotFoundError(f"no {HF_CONFIG} or model_config.json beside {mcore_dir}")
        hf = hf_config_from_model_config(ModelConfig.load(config_dir))
    cfg = ModelConfig.load(config_dir)
    if _state is None:
        distributed.use_layout(1, 1, what="conversion")
        model = build_model(cfg, sparse_layers=(), perform_initialization=False)
        load_model(model, source, missing_masks="keep")
        with atomic_directory(out) as tmp:
            distributed.on_rank0(lambda: _write_hf(model.state_dict(), hf, cfg, config_dir,
                                                   tmp, max_shard_bytes, progress))
        return out
    # the HF exporter's masked weights, into the directory it is writing
    return _write_hf(_state, hf, cfg, config_dir, out, max_shard_bytes, progress)


def _write_hf(state: dict, hf: dict, cfg: ModelConfig, config_dir: Path, out: Path,
              max_shard_bytes: int, progress: bool) -> Path:
    """The HF directory's files from full (TP=1) mcore tensors, on one rank."""
    mapping = TensorMapping(architecture(hf), hf, cfg)
    out.mkdir(parents=True, exist_ok=True)
    # stream: a shard is written as soon as it is full, so at most one shard is held
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[Path, list[str]]] = []
    size = total = 0

    def flush():
        path = out / f"model-{len(files) + 1:05d}.safetensors.partial"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append((path, list(shard)))
        shard.clear()

    for name, tensor in tqdm(mapping.to_hf(state.__getitem__), desc="mcore -> hf",
                             disable=not progress):
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > max_shard_bytes and shard:
            flush()
            size = 0
        shard[name] = tensor.detach().clone().contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(files) == 1:
        files[0][0].replace(out / "model.safetensors")
    else:
        weight_map = {}
        for i, (path, names) in enumerate(files, start=1):
            final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            path.replace(out / final)
            weight_map.update({name: final for name in names})
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    if cfg.tokenizer:
        tok = Path(cfg.tokenizer)
        tok = tok if tok.is_absolute() else config_dir / tok
        if tok.is_dir():
            _copy_tokenizer(tok, out)
    seal(out)
    return out
