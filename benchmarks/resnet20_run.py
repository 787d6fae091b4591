"""A ResNet20 run end to end, as the ormo presets run it, before and after the CPU-path changes, measured in one run.

The run: the preset's model, batch 64, augmentation, weight decay, K = 16 and OrMo, on synthetic CIFAR-shaped data
(CIFAR cannot be downloaded here; the arithmetic is the same): one epoch in miniature, ``--messages`` gradients and
one evaluation of a test split scaled alike (a CIFAR epoch is 781 batch-64 gradients and one evaluation of 10,000
images, so 60 gradients evaluate 768 images), on one torch thread, timed in process CPU time (a loaded machine slows
both sides alike). ``train()`` does everything a real run does: checkpoints, metrics, the event log.

* ``before``: NCHW images and evaluation in batches of 1000 (the project before issue 10's CPU work);
* ``after``: the presets' ``train.channels_last = true`` and evaluation in batches of 128 (today's CPU default).

Runs alternate (which goes first alternates too); the ratio is the median over pairs. Goal (issue 10): ≥ 1.15×.

    python benchmarks/resnet20_run.py [--messages N] [--pairs P] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ormo.experiment import load_config, train
from ormo.experiment import problem as problem_module


def one_run(*, after: bool, messages: int, out: Path) -> float:
    train_size = 50_000
    epochs = messages * 64 / train_size
    test_size = max(64, round(10_000 * messages * 64 / train_size))  # a CIFAR epoch's evaluation, scaled
    cfg = load_config(None, [
        "name=\"resnet20-run\"", "model.name=\"resnet20\"", "data.name=\"synthetic\"",
        f"data.options.train_size={train_size}", f"data.options.test_size={test_size}", "data.augment=true",
        "data.batch_size=64", "method.name=\"ormo\"", "method.lr=0.05", "method.momentum=0.9",
        "train.num_workers=16", "train.weight_decay=1e-4", f"train.epochs={epochs}", f"train.eval_every={epochs}",
        f"train.checkpoint_every={epochs}", "train.threads=1", f"train.channels_last={'true' if after else 'false'}"])
    saved = dict(problem_module.EVAL_BATCH)
    if not after:
        problem_module.EVAL_BATCH.clear()  # every device at EVAL_BATCH_DEFAULT = 1000, as before
    try:
        t0 = time.process_time()
        train(cfg, out, progress=False)
        return time.process_time() - t0
    finally:
        problem_module.EVAL_BATCH.clear()
        problem_module.EVAL_BATCH.update(saved)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60, help="gradients per run (default 60)")
    parser.add_argument("--pairs", type=int, default=2, help="before/after pairs (default 2)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    print(f"torch {torch.__version__}, 1 thread, CPU time; ResNet20, K = 16, {args.messages} gradients + one "
          f"evaluation scaled alike per run (a CIFAR epoch in miniature)")
    ratios, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            seconds = {}
            for after in order:
                seconds[after] = one_run(after=after, messages=args.messages, out=Path(tmp) / f"{i}-{after}")
            ratios.append(seconds[False] / seconds[True])
            rows.append({"before_s": seconds[False], "after_s": seconds[True], "ratio": ratios[-1]})
            print(f"pair {i}: before {seconds[False]:.1f} s, after {seconds[True]:.1f} s, {ratios[-1]:.2f}x",
                  flush=True)
    print(f"faster end to end: {statistics.median(ratios):.2f}x (goal >= 1.15)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
