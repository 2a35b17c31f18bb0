"""model_config.json: the version-1 layout earlier code wrote still loads, a saved config
round-trips, and bad fields fail on load with the field named."""

import json

import pytest
import torch

from maskllm_megatron.model.config import (
    VERSION,
    ModelConfig,
    ModelConfigError,
    TransformerFields,
)

# exactly what conversion of a LLaMA wrote before the version field (sizes partly implied)
VERSION_1 = {
    "transformer": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                    "num_query_groups": 2, "ffn_hidden_size": 128, "normalization": "RMSNorm",
                    "layernorm_epsilon": 1e-6, "activation": "silu", "gated_linear_unit": True,
                    "add_bias_linear": False, "add_qkv_bias": False, "params_dtype": "bfloat16"},
    "vocab_size": 384, "max_sequence_length": 32, "position_embedding_type": "rope",
    "share_embeddings_and_output_weights": False, "rotary_base": 10000.0,
    "rotary_percent": 1.0, "tokenizer": None, "true_vocab_size": 300,
}


def test_version_1_file_loads_and_saves_as_the_current_version(tmp_path):
    (tmp_path / "model_config.json").write_text(json.dumps(VERSION_1))
    cfg = ModelConfig.load(tmp_path)
    assert cfg.version == 1 and cfg.transformer.kv_channels == 16  # hidden // heads
    assert cfg.transformer.num_query_groups == 2 and cfg.true_vocab_size == 300
    cfg.save(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "model_config.json").read_text())
    assert written["version"] == VERSION
    again = ModelConfig.load(tmp_path / "again")
    assert again.transformer == cfg.transformer and again.vocab_size == cfg.vocab_size


def test_transformer_config_resolves_megatron_defaults_the_same_way():
    cfg = ModelConfig(TransformerFields(num_layers=2, hidden_size=64, num_attention_heads=4),
                      vocab_size=128)
    config = cfg.transformer_config(2, 1, params_dtype=torch.bfloat16)
    assert (config.num_query_groups, config.ffn_hidden_size, config.kv_channels) == (4, 256, 16)
    assert config.bf16 and config.params_dtype == torch.bfloat16
    assert config.tensor_model_parallel_size == 2 and config.use_cpu_initialization


def test_init_method_std_reaches_megatron_and_round_trips(tmp_path):
    """The demo trains from scratch with a wider initialisation than megatron's 0.02: the
    field must reach megatron's TransformerConfig and survive a save; old files default."""
    assert ModelConfig.from_dict(VERSION_1).transformer.init_method_std == 0.02
    cfg = ModelConfig(TransformerFields(num_layers=2, hidden_size=64, num_attention_heads=4,
                                        init_method_std=0.07), vocab_size=128)
    config = cfg.transformer_config(1, 1)
    assert config.init_method_std == 0.07
    weight = torch.empty(256, 256)
    config.init_method(weight)
    assert abs(weight.std().item() - 0.07) < 0.003
    cfg.save(tmp_path)
    assert ModelConfig.load(tmp_path).transformer.init_method_std == 0.07


@pytest.mark.parametrize("change, message", [
    ({"num_layers": 0}, "transformer.num_layers must be positive"),
    ({"hidden_size": "64"}, "transformer.hidden_size must be int"),
    ({"num_query_groups": 3}, "num_query_groups 3 must divide"),
    ({"activation": "tanh"}, "transformer.activation 'tanh' is unknown"),
    ({"normalization": "BatchNorm"}, "transformer.normalization 'BatchNorm' is unknown"),
    ({"gated_linear_unit": 1}, "transformer.gated_linear_unit must be bool"),
    ({"params_dtype": "float64"}, "transformer.params_dtype 'float64' is unknown"),
    ({"init_method_std": 0.0}, "transformer.init_method_std must be positive"),
    ({"init_method_std": "0.02"}, "transformer.init_method_std must be"),
    ({"hidden_dropout": 0.1}, r"unknown transformer fields \['hidden_dropout'\]"),
    ({"window_size": [6]}, "transformer.window_size must be two non-negative integers"),
    ({"window_size": [6, -1]}, "transformer.window_size must be two non-negative integers"),
])
def test_bad_transformer_fields_name_the_field(tmp_path, change, message):
    data = json.loads(json.dumps(VERSION_1))
    data["transformer"].update(change)
    (tmp_path / "model_config.json").write_text(json.dumps(data))
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.load(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 0}, "vocab_size must be positive"),
    ({"true_vocab_size": 999}, "true_vocab_size 999 exceeds"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type 'alibi' is unknown"),
    ({"rotary_percent": 0}, r"rotary_percent must lie in \(0, 1\]"),
    ({"version": VERSION + 1}, f"version {VERSION + 1} is not one this code reads"),
    ({"vocab": 3}, r"unknown keys \['vocab'\]"),
])
def test_bad_model_fields_name_the_field(change, message):
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_dict({**VERSION_1, **change})


def test_missing_required_fields_are_named():
    transformer = {k: v for k, v in VERSION_1["transformer"].items() if k != "hidden_size"}
    with pytest.raises(ModelConfigError, match="lacks transformer.hidden_size"):
        ModelConfig.from_dict({**VERSION_1, "transformer": transformer})
    with pytest.raises(ModelConfigError, match="lacks a positive vocab_size"):
        ModelConfig.from_dict({k: v for k, v in VERSION_1.items() if k != "vocab_size"})


def test_a_sliding_window_reaches_megatron_without_the_fused_softmax(tmp_path):
    """Mistral's window: saved only when set (files without one stay readable by older code),
    handed to megatron as a tuple, and never with the fused softmax kernel that ignores it."""
    cfg = ModelConfig.from_dict(VERSION_1)
    cfg.save(tmp_path / "full")
    assert "window_size" not in json.loads(
        (tmp_path / "full" / "model_config.json").read_text())["transformer"]
    assert cfg.transformer_config().window_size is None
    cfg.transformer.window_size = [6, 0]
    cfg.save(tmp_path / "windowed")
    again = ModelConfig.load(tmp_path / "windowed")
    assert again.transformer.window_size == [6, 0]
    config = again.transformer_config(masked_softmax_fusion=True)
    assert config.window_size == (6, 0) and not config.masked_softmax_fusion
