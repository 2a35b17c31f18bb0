"""``maskllm eval-ppl --protocol``: under each named protocol our perplexity equals transformers'
on the same tiny LLaMA and corpus, computed as the SparseGPT / Wanda evaluation code does
(tokenise the joined text once, BOS first; non-overlapping windows, ``nsamples = numel //
seqlen``; exp of the mean window loss). ``demo`` stays the default and keeps its tail window; an
unknown name is the one-line error. The commands run in this process, as in test_error_surface.
"""

import gzip
import json
import math
import random

import pytest
import torch

from maskllm_megatron.cli import main
from maskllm_megatron.errors import InputError
from maskllm_megatron.eval.protocols import PROTOCOLS, get_protocol, protocol_text

WORDS = "the cat sat on a mat dog ran far away and then slept under old tree".split()


def _records(rng, n, words):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A LLaMA-like SentencePiece model (BOS 1, EOS 2, byte fallback, no normalisation, so
    newlines are tokens and the join string matters), a tiny HF LLaMA converted with it, a
    WikiText-2-like raw test file (and its records as JSONL), a C4-like gzipped JSONL."""
    import sentencepiece as spm
    from test_convert import hf_model

    root = tmp_path_factory.mktemp("protocols")
    rng = random.Random(0)
    wiki = []  # the records as Hugging Face's wikitext loader yields them
    for section in range(8):
        wiki += ["", f" = Section {section} = \n", ""]
        wiki += [f" {line} . \n" for line in _records(rng, 6, (6, 14))]
    (root / "wiki.test.raw").write_text("".join(r or " \n" for r in wiki))
    (root / "wiki.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in wiki))
    c4 = _records(rng, 1200, (2, 8))
    with gzip.open(root / "c4-validation.json.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": r, "url": "x"}) + "\n" for r in c4)
    spm.SentencePieceTrainer.train(
        input=str(root / "wiki.test.raw"), model_prefix=str(root / "spm"), vocab_size=300,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    hf_model("llama").save_pretrained(root / "hf")
    assert main(["convert", "hf-to-mcore", "--hf", str(root / "hf"), "--out", str(root / "m"),
                 "--tokenizer", str(root / "spm.model"), "--no-progress"]) == 0
    return root, wiki, c4


def _eval_ppl(capsys, root, *args):
    """(the protocol line, ppl, windows) of ``maskllm eval-ppl``."""
    assert main(["eval-ppl", "--load", str(root / "m"), "--no-progress", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    row = lines[-1].split()
    said = [line for line in lines if line.startswith("protocol ")]
    assert len(said) == 1 and lines[-3] == said[0], lines  # above the table
    return said[0], float(row[-1]), int(row[2])


def _transformers_ppl(root, text, seqlen, bos, max_windows=None, keep_tail=False):
    """The reference: SparseGPT's ``llama_eval`` on the HF model (``keep_tail``: the demo's
    token-weighted tail window instead)."""
    import sentencepiece as spm
    import transformers as tf

    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    ids = torch.tensor([sp.encode(text, add_bos=bos)])  # what LlamaTokenizer(text) gives
    model = tf.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    if max_windows is not None:
        ids = ids[:, :max_windows * seqlen]
    nsamples = ids.numel() // seqlen
    windows = [ids[:, i * seqlen:(i + 1) * seqlen] for i in range(nsamples)]
    if keep_tail and ids.numel() - nsamples * seqlen >= 2:
        windows.append(ids[:, nsamples * seqlen:])
    with torch.no_grad():
        losses = [float(torch.nn.functional.cross_entropy(model(w).logits[0, :-1], w[0, 1:]))
                  for w in windows]
    if keep_tail:  # the demo: a mean over every predicted token
        counts = [w.shape[1] - 1 for w in windows]
        mean = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    else:  # SparseGPT: nlls.append(loss * seqlen); exp(sum(nlls) / (nsamples * seqlen))
        mean = sum(loss * seqlen for loss in losses) / (nsamples * seqlen)
    return math.exp(mean), len(windows)


def test_each_protocol_equals_transformers_as_sparsegpt_evaluates(setup, capsys):
    root, wiki, c4 = setup
    raw, jsonl = root / "wiki.test.raw", root / "wiki.jsonl"
    c4_file = root / "c4-validation.json.gz"
    # a seq-length override keeps it fast; c4 at 16 tokens reaches its 256-window cap
    cases = [("wikitext2-2048", raw, 64, "\n\n".join(wiki), None),
             ("wikitext2-2048", jsonl, 64, "\n\n".join(wiki), None),
             ("wikitext2-4096", raw, 48, "\n\n".join(wiki), None),
             ("c4-2048", c4_file, 16, " ".join(c4[:1100]), 256)]
    for name, path, seq, text, cap in cases:
        line, ppl, windows = _eval_ppl(capsys, root, "--protocol", name, "--text", str(path),
                                       "--seq-length", str(seq), "--micro-batch-size", "32")
        want, nsamples = _transformers_ppl(root, text, seq, bos=True, max_windows=cap)
        assert ppl == pytest.approx(want, rel=1e-4), (name, path.name)
        assert windows == nsamples and (cap is None or windows == cap), (name, windows)
        assert line.startswith(f"protocol {name}: ") and "a BOS first" in line, line
        assert f"windows of {seq} tokens (--seq-length" in line and "dropped" in line, line


def test_demo_is_the_default_and_unchanged(setup, capsys):
    """The file as it is, no BOS even though the tokenizer has one, the tail window kept."""
    root, _, _ = setup
    raw = root / "wiki.test.raw"
    default = _eval_ppl(capsys, root, "--text", str(raw), "--seq-length", "64")
    named = _eval_ppl(capsys, root, "--protocol", "demo", "--text", str(raw), "--seq-length", "64")
    assert default == named
    line, ppl, windows = named
    assert line.startswith("protocol demo: the file tokenised as it is, no BOS, ")
    assert "last partial window kept" in line
    want, counted = _transformers_ppl(root, raw.read_text(), 64, bos=False, keep_tail=True)
    assert windows == counted
    assert ppl == pytest.approx(want, rel=1e-4)


def test_corpus_forms_give_the_records_joined(setup, tmp_path):
    root, wiki, c4 = setup
    wikitext = get_protocol("wikitext2-2048")
    assert protocol_text(root / "wiki.test.raw", wikitext) == "\n\n".join(wiki)
    assert protocol_text(root / "wiki.jsonl", wikitext) == "\n\n".join(wiki)
    c4_protocol = PROTOCOLS["c4-2048"]
    assert protocol_text(root / "c4-validation.json.gz", c4_protocol) == " ".join(c4[:1100])
    joined = tmp_path / "c4.txt"  # plain text: the already joined text
    joined.write_text(" ".join(c4[:1100]))
    assert protocol_text(joined, c4_protocol) == " ".join(c4[:1100])
    assert protocol_text(root / "wiki.test.raw", get_protocol(None)) == \
        (root / "wiki.test.raw").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"title": "b"}\n')
    with pytest.raises(InputError, match="line 2 has no string \"text\" field"):
        protocol_text(bad, c4_protocol)


def test_unknown_protocol_and_a_too_long_window_are_one_line_errors(setup, capsys):
    root, _, _ = setup
    text = str(root / "wiki.test.raw")
    for args, says in ((["--protocol", "wikitext2"], "unknown --protocol 'wikitext2'; give one "
                                                     "of demo, wikitext2-2048, wikitext2-4096, "
                                                     "c4-2048"),
                       (["--protocol", "wikitext2-2048"], "protocol wikitext2-2048 scores "
                                                          "windows of 2048 tokens, more than the "
                                                          "model's max_sequence_length 64")):
        assert main(["eval-ppl", "--load", str(root / "m"), "--text", text, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: maskllm eval-ppl: ") and err.count("\n") == 1, err
        assert says in err, err
