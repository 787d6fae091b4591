"""Gradients per second on one device (the GPU when there is one, else the CPU), three ways, in one run.

* ``sequential``: what the simulator does today: ``Simulator.step`` computes one message's gradient at a time
  (OrMo, K workers, batch 64 of 32×32×3 synthetic images, CIFAR's shape).
* ``batched``: the engine's batched in-flight gradients (``train.batch_workers = true``, ``batch`` = K): when the
  server needs a message, every dispatched worker's message is computed in one ``torch.func.vmap`` call (per-worker
  BatchNorm statistics included), then consumed one per iteration: the whole simulator, updates and bookkeeping
  included.
* ``packed``: R independent sequential simulations in R processes sharing the device (``ormo sweep
  --runs-per-device R``), their rates added.

Each way runs as ``ormo train`` would on that device: on a GPU with the checks and losses deferred
(``train.deferred_checks = "auto"``: no host sync per message, read every 781 messages, a CIFAR epoch). On a GPU a
fourth column, ``each-msg``, is the sequential way reading its checks and loss at every message (as before deferred
checks), and its ratio is what deferring gains.

For MLP, LeNet and ResNet20 at K = 16 and 64, plus the device's utilisation while the sequential loop runs (sampled
from nvidia-smi; "n/a" on CPU) and the projected device-hours of OrMo Table 1 on CIFAR-10 (6 methods × 4 settings ×
5 seeds = 120 runs of 160 epochs × 50,000 / 64 = 125,000 ResNet20 gradients, half at K = 16 and half at K = 64).

    python benchmarks/gpu_throughput.py [--quick] [--seconds S] [--packed R] [--json PATH]

Each measurement runs for about ``--seconds`` (default 4 on a GPU; ``--quick`` 1.5) after a warm-up, so the whole
script takes about 5 minutes on a GPU and 3–4 minutes on 2 CPU cores with ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import threading
import time

import torch

from ormo.data import load_dataset
from ormo.engine import Simulator
from ormo.experiment import load_config
from ormo.experiment.problem import TrainProblem

MODELS = ("mlp", "lenet", "resnet20")
KS = (16, 64)
TABLE1_RUNS, TABLE1_GRADIENTS = 120, 160 * 50_000 // 64


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(step, seconds: float, device: str, *, ready=None, util: Utilisation | None = None) -> float:
    """Gradients per second over about ``seconds`` of ``step()`` calls (each returns how many it computed), after one
    warm-up call. ``ready``: a barrier passed before timing (packed runs start their windows together); ``util``:
    sampled during the timed window only."""
    step()
    _sync(device)
    if ready is not None:
        ready.wait()
    if util is not None:
        util.start()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        count += step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    if util is not None:
        util.stop()
    return count / elapsed


def _dataset():
    return load_dataset("synthetic", train_size=4096, test_size=64, image_shape=(3, 32, 32), seed=0)


READ_EVERY = 781  # messages between read-outs of the deferred checks (a CIFAR-10 epoch at batch 64)


def sequential(model: str, k: int, device: str, seconds: float, *, ready=None,
               util: Utilisation | None = None, batch: int = 0, defer: bool | None = None) -> float:
    """Messages per second of the simulator (OrMo) on ``model`` with K workers: one gradient at a time, or with
    ``batch`` > 0 the engine's batched in-flight gradients (``train.batch_workers``). ``defer``: deferred checks
    (default: as ``train.deferred_checks = "auto"``: the device record on CUDA; on a CPU the state at read-outs one
    message at a time, each batch checked when batched; False: each message checked)."""
    checks: bool | str = device.startswith("cuda") if defer is None else defer
    if defer is None and not checks and not batch:
        checks = "state"
    defer = checks is True
    cfg = load_config(None, [f'model.name="{model}"', "data.batch_size=64", f"train.num_workers={k}",
                             "method.lr=0.01", "method.momentum=0.9", f'train.device="{device}"'])
    problem = TrainProblem(cfg, dataset=_dataset())
    problem.defer_sync = defer
    sim = Simulator(cfg.method.build(), problem.params0, problem.grad_fn, num_workers=k, num_iterations=10**9,
                    timing=cfg.timing.build(), seed=0, batch=batch,
                    grad_batch=problem.grad_batch if batch else None,
                    on_consume=problem.select_message if batch else None, defer_checks=checks)
    losses: list = []

    def step() -> int:
        sim.step()
        losses.append(problem.commit_message())
        if len(losses) >= READ_EVERY:  # the read-out an evaluation does
            sim.flush_checks()
            if defer:
                torch.stack(losses).tolist()
            losses.clear()
        return 1

    return _timed(step, seconds, device, ready=ready, util=util)


def batched(model: str, k: int, device: str, seconds: float) -> float:
    """The engine's batched mode, every in-flight message in one batch (at most K)."""
    return sequential(model, k, device, seconds, batch=k)


def _packed_worker(model: str, k: int, device: str, seconds: float, out, ready) -> None:
    torch.set_num_threads(1)
    out.put(sequential(model, k, device, seconds, ready=ready))


def packed(model: str, k: int, device: str, seconds: float, runs: int) -> float:
    """The summed rate of ``runs`` processes whose timed windows start together (after every one has warmed up)."""
    ctx = mp.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Barrier(runs)
    procs = [ctx.Process(target=_packed_worker, args=(model, k, device, seconds, out, ready)) for _ in range(runs)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


class Utilisation:
    """Samples the utilisation of the GPU this process uses (the first of CUDA_VISIBLE_DEVICES, else 0) with
    nvidia-smi every 0.2 s between :meth:`start` and :meth:`stop`; nothing on CPU or without nvidia-smi."""

    def __init__(self, device: str) -> None:
        import os

        self.samples: list[float] = []
        self.enabled = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        self.gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                       "-i", self.gpu], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(text.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--seconds", type=float, default=None, help="length of each measurement")
    parser.add_argument("--packed", type=int, default=4, help="runs packed on the device (default 4; 1: none)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.seconds is not None and not (0 < args.seconds < float("inf")):
        parser.error(f"--seconds {args.seconds}: must be a finite number > 0")
    if args.packed < 1:
        parser.error(f"--packed {args.packed}: must be >= 1 (1: no packed runs)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # as each packed run: one thread each, so the three ways compare on the same footing
        torch.set_num_threads(1)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {seconds:g} s per measurement", flush=True)
    cuda = device == "cuda"
    print(f"{'model':9s} {'K':>3s} {'sequential/s':>13s} {'batched/s':>10s} {'x':>6s} {'packed/s':>9s} {'x':>6s} "
          f"{'util %':>7s}{' each-msg/s      x' if cuda else ''}", flush=True)
    results = []
    for model in MODELS:
        for k in KS:
            util = Utilisation(device)
            seq = sequential(model, k, device, seconds, util=util)
            bat = batched(model, k, device, seconds)
            pk = packed(model, k, device, seconds, args.packed) if args.packed > 1 else None
            each = sequential(model, k, device, seconds, defer=False) if cuda else None
            r = {"model": model, "k": k, "device": device, "sequential_per_s": seq, "batched_per_s": bat,
                 "packed_per_s": pk, "packed_runs": args.packed, "utilisation_pct": util.mean(),
                 "deferred_checks": cuda, "each_message_checked_per_s": each}
            results.append(r)
            u = f"{r['utilisation_pct']:.0f}" if r["utilisation_pct"] is not None else "n/a"
            pk_text = f"{pk:9.1f} {pk / seq:6.2f}" if pk is not None else f"{'-':>9s} {'-':>6s}"
            each_text = f" {each:10.1f} {seq / each:6.2f}" if each is not None else ""
            print(f"{model:9s} {k:3d} {seq:13.1f} {bat:10.1f} {bat / seq:6.2f} {pk_text} {u:>7s}{each_text}",
                  flush=True)
    res20 = {r["k"]: r for r in results if r["model"] == "resnet20"}
    total = TABLE1_RUNS * TABLE1_GRADIENTS
    print(f"\nOrMo Table 1 on CIFAR-10 ({TABLE1_RUNS} runs x {TABLE1_GRADIENTS:,} ResNet20 gradients), projected "
          f"{device}-hours:")
    for label, key in (("sequential", "sequential_per_s"), ("batched", "batched_per_s"), ("packed", "packed_per_s")):
        rates = [res20[k][key] for k in KS if res20.get(k) and res20[k][key]]
        if len(rates) == len(KS):  # half the gradients at each K
            hours = sum(total / len(KS) / rate for rate in rates) / 3600
            print(f"  {hours:10.1f} h  {label}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
