"""Scale of the Ray runtime on one machine: K logical workers packed into a few worker processes.

For each K (default 8, 16, 32, 64) one run of the quickstart MLP on digits whose workers emulate a fixed compute time
per message by a sleep of ``--step-ms`` (400 ms by default, the issue's setting; jitter off), on a fresh local Ray
instance that the run starts itself. Reported per K:

* ``processes``: worker processes hosting the K workers (``ray.workers_per_actor``, default one per CPU);
* ``peak RSS`` and ``peak PSS``: the largest total, sampled every 0.25 s, over the driver and every process it started
  (Ray's GCS, raylet and helpers, the server, the workers). RSS counts shared pages (torch's libraries) once per
  process; PSS splits them between the processes sharing them, so it is what the machine really spends;
* ``first message``: from the call to the first applied message (Ray's start, the processes, their data);
* ``throughput / ideal``: updates/s between the K-th and the last update, against K / w, w being the workers' own
  measured time per message (gradient + sleep, as they report it): what is lost is the runtime's.

Goals (issue 9): K = 64 with total RSS ≤ 4 GB and the first message ≤ 20 s; throughput ≥ 0.9× ideal at K = 8 and
≥ 0.85× at K = 64. Run: ``python benchmarks/ray_scale.py [--ks 8,16,32,64] [--step-ms 400] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
from pathlib import Path

from ormo.experiment import load_config, train

BASE = ["model.name=mlp", "data.batch_size=16", "method.name=ormo", "method.lr=0.01", "method.momentum=0.9",
        "timing.jitter=none", "train.threads=1"]
TRAIN_EXAMPLES = 1438  # digits, as the quickstart splits it


def _tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    """Total RSS and PSS in bytes (a process that is gone counts nothing)."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def measure(k: int, step_s: float, messages_per_worker: int, out: Path) -> dict:
    epochs = messages_per_worker * k * 16 / TRAIN_EXAMPLES
    cfg = load_config(None, [*BASE, f"train.num_workers={k}", f"train.epochs={epochs}", f"train.eval_every={epochs}",
                             f"train.checkpoint_every={epochs}", f"ray.time_scale={step_s}"])
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            rss, pss = _memory(_tree(os.getpid()))
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        train(cfg, out, engine="ray", progress=False)
    finally:
        done.set()
        sampler.join()
    summary = json.loads((out / "run.json").read_text())["summary"]
    times = [json.loads(line)["sim_time"] for line in (out / "events.jsonl").read_text().splitlines()[1:]]
    steady = times[k:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    ideal = k / summary["worker_time_per_message_s"]
    return {"k": k, "processes": summary["worker_processes"], "peak_rss_gb": peak[0] / 2**30,
            "peak_pss_gb": peak[1] / 2**30, "first_message_s": summary["first_message_s"],
            "updates_per_s": rate, "ideal_per_s": ideal, "ratio": rate / ideal, "iterations": len(times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="8,16,32,64", help="numbers of logical workers (comma-separated)")
    parser.add_argument("--step-ms", type=float, default=400.0, help="emulated compute per message")
    parser.add_argument("--messages-per-worker", type=int, default=25)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results = []
    print(f"Ray scale: {args.step_ms:g} ms emulated step, {args.messages_per_worker} messages per worker, "
          f"{os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in args.ks.split(",")):
            r = measure(k, args.step_ms / 1000, args.messages_per_worker, Path(tmp) / f"k{k}")
            results.append(r)
            print(f"K = {k:3d} on {r['processes']} processes: peak RSS {r['peak_rss_gb']:.2f} GB (PSS "
                  f"{r['peak_pss_gb']:.2f} GB), first message {r['first_message_s']:.1f} s, "
                  f"{r['updates_per_s']:.1f} updates/s = {r['ratio']:.3f} x ideal ({r['ideal_per_s']:.1f})",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
