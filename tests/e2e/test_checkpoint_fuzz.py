"""Damaged checkpoints: truncated and bit-flipped copies of every file kind this package writes,
fed to the loader that reads it. Each case must end in a clear error naming the file (a
maskllm ``UserError``, or a failed validator check) or, where the damage misses what is read, in
a load equal to the undamaged one; never another exception, a hang or a silently wrong tensor.

All cases run in one subprocess (one process group, no state left in pytest), which prints a
JSON line per case; the test checks them."""

import json
import subprocess
import sys

from cli_runner import ENV

SEED = 20261130
CASES_PER_KIND = 4  # half truncated, half bit-flipped

FUZZ = r"""
import argparse, json, random, signal, sys, time, traceback
from pathlib import Path
import torch
from maskllm_megatron import distributed
from maskllm_megatron.cpu_shims import cpu_shims
from maskllm_megatron.errors import UserError
from maskllm_megatron.interop import hf as convert
from maskllm_megatron.interop.hf import HFReader
from maskllm_megatron.deploy import export
from maskllm_megatron.deploy.validate import validate_trtllm
from maskllm_megatron.pruning.oneshot import prune_checkpoint
from maskllm_megatron.checkpoint.prior import apply_prior_checkpoint
from maskllm_megatron.core.nm import NMPattern
from maskllm_megatron.model.build import build_model
from maskllm_megatron.model.config import ModelConfig
from maskllm_megatron.model.layers import MaskSettings, assign_layer_ids
from maskllm_megatron.training import loop
from maskllm_megatron.training.args import TrainArgs

base, corpus = Path(sys.argv[1]), Path(sys.argv[2])
seed, per_kind = int(sys.argv[3]), int(sys.argv[4])
P24 = NMPattern(2, 4)


def tensors_of(tree):
    return {k: v.detach().clone() for k, v in tree.items() if torch.is_tensor(v)}


with cpu_shims():
    distributed.init_distributed(device="cpu")
    t0 = time.time()
    # ---- what every command writes: conversion, pruning (+ masks-only prior), exports, a run
    convert.hf_to_mcore(base / "hf", base / "mcore", progress=False)
    prune_checkpoint(argparse.Namespace(
        method="magnitude", load=str(base / "mcore"), save=str(base / "pruned"),
        model_config=None, tokenizer=None, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, seq_length=None, micro_batch_size=1, N=2, M=4,
        seed=1234, progress=False, device="cpu", bf16=False, fp16=False, fp32=False,
        sequence_parallel=False, transformer_impl=None, data_path=[], calib_samples=0,
        update_weights=False, row_parallel_hessian="gather"))
    pruned = base / "pruned" / "pruned"
    loaded = export.load_for_export(pruned)
    export.export_trtllm(pruned, base / "trt", 1, 1, "float32", loaded=loaded, progress=False)
    export.export_hf(pruned, base / "hfx", progress=False)
    train_args = TrainArgs(
        model_config=str(corpus / "model"), data_path=[str(corpus / "data" / "docs")],
        split="100,0,0", micro_batch_size=2, global_batch_size=2, seq_length=16,
        train_iters=2, save=str(base / "run"), save_interval=1, keep_checkpoints=2, seed=3,
        progress=False, log_interval=1, device="cpu")
    train_args.validate()
    loop.train(train_args)
    print(json.dumps({"built_s": round(time.time() - t0, 1)}), flush=True)

    # ---- the loaders, each returning what it read (compared with the undamaged read)
    def load_mcore(directory):
        model, cfg, mode, pattern, _, _ = export.load_for_export(directory)
        return {"tensors": tensors_of(model.state_dict()), "cfg": cfg.to_dict(), "mode": mode}

    def load_prior(directory):
        cfg = ModelConfig.load(base / "mcore")
        distributed.use_layout(1, 1)
        model = build_model(cfg, MaskSettings(pattern=P24, mode="learn"))
        assign_layer_ids(model, logits_seed=5)
        apply_prior_checkpoint(model, directory, 3.0)
        return {"tensors": tensors_of(model.state_dict())}

    def load_run(directory):
        distributed.use_layout(1, 1)
        cfg = loop._model_config(train_args)
        model = loop._build_model(train_args, cfg, distributed.current_layout())
        chunk, optimizer = loop._optimizer(model, train_args, torch.device("cpu"))
        start = loop._restore(train_args, model, optimizer, None, P24)
        moments = optimizer.gather_moments()
        flat = {f"{i}.{name}": t for i, p in enumerate(optimizer.params())  # in parameter order
                for name, t in moments[id(p)].items()}
        return {"start": start, "tensors": tensors_of(model.state_dict()),
                "moments": tensors_of(flat)}

    def load_hf(directory):
        reader = HFReader(directory)
        return {"tensors": {name: reader(name).clone() for name in sorted(reader.where)},
                "config": json.loads((directory / "config.json").read_text())}

    def load_masks(directory):
        return {"tensors": export.load_packed_masks(directory)}

    def load_trt(directory):
        report = validate_trtllm(directory)
        return {"ok": report.ok, "violations": report.violations}

    it = base / "run" / "iter_0000002"
    kinds = {  # file -> (the directory its loader is given, loader)
        "mcore/.metadata": ("mcore", load_mcore), "mcore/__0_0.distcp": ("mcore", load_mcore),
        "mcore/common.pt": ("mcore", load_mcore), "mcore/metadata.json": ("mcore", load_mcore),
        "mcore/maskllm.json": ("mcore", load_mcore),
        "mcore/model_config.json": ("mcore", load_mcore),
        "mcore/checksums.json": ("mcore", load_mcore),
        "pruned/pruned/__0_0.distcp": ("pruned/pruned", load_mcore),
        "pruned/pruned/maskllm.json": ("pruned/pruned", load_mcore),
        "pruned/masks/__0_0.distcp": ("pruned/masks", load_prior),
        "pruned/masks/.metadata": ("pruned/masks", load_prior),
        "run/latest": ("run", load_run), "run/checksums.json": ("run", load_run),
        "run/iter_0000002/train_state.json": ("run", load_run),
        "run/iter_0000002/checksums.json": ("run", load_run),
        "run/iter_0000002/model/__0_0.distcp": ("run", load_run),
        "run/iter_0000002/model/common.pt": ("run", load_run),
        "run/iter_0000002/optimizer/__0_0.distcp": ("run", load_run),
        "run/iter_0000002/optimizer/.metadata": ("run", load_run),
        "run/iter_0000002/optimizer/metadata.json": ("run", load_run),
        "hfx/model.safetensors": ("hfx", load_hf), "hfx/config.json": ("hfx", load_hf),
        "hfx/nm_masks.safetensors": ("hfx", load_masks),
        "hfx/checksums.json": ("hfx", load_masks),
        "trt/rank0.safetensors": ("trt", load_trt), "trt/config.json": ("trt", load_trt),
        "trt/checksums.json": ("trt", load_trt),
    }
    reference = {}
    for kind, (directory, loader) in kinds.items():
        if directory not in reference:
            reference[directory] = loader(base / directory)
    assert reference["trt"]["ok"], reference["trt"]

    def same(got, want):
        if set(got) != set(want):
            return False
        for key in want:
            a, b = got[key], want[key]
            if isinstance(b, dict) and b and all(torch.is_tensor(v) for v in b.values()):
                if set(a) != set(b) or not all(
                        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                        and torch.equal(a[k], b[k]) for k in b):
                    return False
            elif a != b:
                return False
        return True

    def alarm(*_):
        raise TimeoutError("case took over 60 s")

    signal.signal(signal.SIGALRM, alarm)
    rng = random.Random(seed)
    for kind, (directory, loader) in kinds.items():
        path = base / kind
        original = path.read_bytes()
        for case in range(per_kind):
            if case % 2 == 0 or len(original) == 0:
                cut = rng.randrange(len(original))
                damaged, how = original[:cut], f"truncated to {cut} of {len(original)} bytes"
            else:
                byte, bit = rng.randrange(len(original)), rng.randrange(8)
                damaged = bytearray(original)
                damaged[byte] ^= 1 << bit
                damaged, how = bytes(damaged), f"bit {bit} of byte {byte} flipped"
            path.write_bytes(damaged)
            record = {"kind": kind, "damage": how}
            start = time.time()
            signal.alarm(60)
            try:
                got = loader(base / directory)
                if loader is load_trt and not got["ok"]:
                    record["outcome"] = "check failed"
                    record["message"] = "; ".join(got["violations"])
                else:
                    record["outcome"] = ("same load" if same(got, reference[directory])
                                         else "WRONG LOAD")
            except UserError as err:
                record["outcome"], record["message"] = "error", str(err)
                record["error"] = type(err).__name__
            except BaseException as err:  # noqa: BLE001 - reported as a failure
                record["outcome"] = "CRASH"
                record["message"] = "".join(traceback.format_exception(err))[-2000:]
            finally:
                signal.alarm(0)
                path.write_bytes(original)
            record["seconds"] = round(time.time() - start, 2)
            print(json.dumps(record), flush=True)
    distributed.shutdown()
"""


def test_damaged_files_are_errors_naming_them_or_identical_loads(corpus, tmp_path):
    from test_convert import hf_model

    hf_model("llama").save_pretrained(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path), str(corpus), str(SEED),
                           str(CASES_PER_KIND)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [r for r in lines if "kind" in r]
    kinds = {r["kind"] for r in records}
    assert len(records) == len(kinds) * CASES_PER_KIND >= 50
    bad = []
    for r in records:
        name = r["kind"].rsplit("/", 1)[-1]
        if r["outcome"] in ("error", "check failed"):
            if name not in r["message"]:
                bad.append(f"{r['kind']} ({r['damage']}): the message does not name {name}: "
                           f"{r['message']}")
        elif r["outcome"] != "same load":
            bad.append(f"{r['kind']} ({r['damage']}): {r['outcome']}: {r.get('message', '')}")
    assert not bad, "\n".join(bad)
