"""Run test bodies on a persistent pool of gloo ranks (CPU), re-initialising TP x PP per case.

Starting ranks costs most of a distributed test on CPU (import megatron-core, init gloo: ~15 s
for 4 ranks on 2 cores), so the pool starts once per pytest session and each call only resets
megatron's parallel state. Bodies must be module-level functions (pickled by reference); they
run on every rank with the layout already set and return picklable values. Ranks compute on
the CPU inside the CPU shims (the harness is an entry point), also on a GPU machine.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import traceback
import warnings

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # several ranks share 2 cores
    from maskllm_megatron import distributed
    from maskllm_megatron.cpu_shims import cpu_shims

    with cpu_shims():
        # a mismatched collective fails in 2 min
        distributed.init_distributed(1, 1, timeout_s=120, device="cpu")
        _serve(rank, tasks, results)
        distributed.shutdown()


def _serve(rank: int, tasks, results) -> None:
    from maskllm_megatron import distributed

    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, tp, pp, seed = task
        try:
            distributed.set_model_parallel(tp, pp, seed)
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the test process
            results.put((rank, False, traceback.format_exc()))


class DistributedPool:
    """``world_size`` spawned ranks; ``run(fn, *args, tp=, pp=)`` returns per-rank results."""

    def __init__(self, world_size: int, timeout_s: float = 300.0):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(self.world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, daemon=False,  # ranks may start helper processes
                                  args=(r, self.world_size, port, self.tasks[r], self.results))
                      for r in range(self.world_size)]
        for proc in self.procs:
            proc.start()
        atexit.register(self.close)

    def run(self, fn, *args, tp: int = 1, pp: int = 1, seed: int = 1234) -> list:
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.close()
            self._start()
        for q in self.tasks:
            q.put((fn, args, tp, pp, seed))
        values, failures = [None] * self.world_size, []
        for _ in range(self.world_size):
            try:
                timeout = 20.0 if failures else self.timeout_s  # others may hang after a failure
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                failures.append("timed out waiting for a rank (hung collective?)")
                break
            if ok:
                values[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            self.close()  # the next run starts a fresh pool
            raise AssertionError(f"{fn.__name__} (TP={tp}, PP={pp}) failed:\n" +
                                 "\n".join(failures))
        return values

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                for q in self.tasks:
                    q.put(None)
                break
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        self.procs = []
