"""Test setup. Tiers follow the directories and are markers of the same names: ``unit`` (one
process, seconds), ``dist`` (gloo ranks on a warm pool), ``e2e`` (the CLI, the demo, builds),
``gpu`` (skipped without CUDA; ``pytest -m gpu`` on a GPU machine). Without a GPU the Triton
kernels run on CPU tensors through the interpreter. Every test is seeded (``--test-seed``)."""

import os

import torch

# Must be set before triton kernels are defined (at import of maskllm_megatron.sampling); on a
# GPU machine the kernels are compiled for the device instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
from dist_harness import DistributedPool  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--test-seed", default="1234",
                     help="seed of every test's random inputs (each test mixes in its own id); "
                          "'random' draws a fresh one, printed in the header to rerun with")


def pytest_configure(config):
    value = config.getoption("--test-seed")
    config.test_seed = random.SystemRandom().randrange(2**31) if value == "random" else int(value)


def pytest_report_header(config):
    return f"test seed: {config.test_seed} (rerun with --test-seed {config.test_seed})"


@pytest.fixture(autouse=True)
def seeded(request):
    """torch, numpy and random seeded per test from the session seed and the test's id:
    a failure reruns with the same inputs."""
    import numpy as np

    seed = (request.config.test_seed ^ zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


TIERS = ("unit", "dist", "e2e", "gpu")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dist4():
    """Four gloo ranks for the whole session; each test sets its own TP x PP."""
    pool = DistributedPool(4)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Tokenizer, indexed dataset and model config for a 2-layer GPT (seconds to build)."""
    from maskllm_megatron.data.preprocess import preprocess
    from maskllm_megatron.data.tokenizer import train_tokenizer
    from maskllm_megatron.model.config import ModelConfig, TransformerFields

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the cat sat on a mat dog ran far away and then slept under old tree".split()
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40))
                              for _ in range(400)))
    docs = root / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))})
                              for _ in range(400)))
    model = train_tokenizer([text], root / "spm", vocab_size=300)
    preprocess([docs], model, root / "data" / "docs", progress=False)
    ModelConfig(transformer=TransformerFields(num_layers=2, hidden_size=64,
                                              num_attention_heads=4, ffn_hidden_size=128,
                                              activation="gelu", add_bias_linear=True),
                vocab_size=384, max_sequence_length=32, tokenizer=str(model)).save(root / "model")
    return root
