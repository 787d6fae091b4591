"""Sweeps: methods × settings × seeds, in parallel processes, resumable.

A config file may carry a ``[sweep]`` section (ignored by ``ormo train``)::

    [sweep]
    methods = ["ormo", {name = "orlomo", label = "orlomo-H", set = {"method.options.group_decay" = "beta_pow_H"}}]
    seeds = [0, 1, 2]

    [[sweep.settings]]
    label = "K=16 hom."
    set = {"train.num_workers" = 16, "timing.model" = "homogeneous"}

A method given as a table may carry a ``label`` (its name in the run directory and the table; needed to run two
variants of one rule). Overrides from the command line (``--set``) apply after the settings' and the methods'.
Each run goes to ``OUT/<setting>/<method label>/seed<k>``; ``OUT/sweep.json`` records the order of the settings and
methods for ``ormo table``. Running the sweep again skips finished runs and resumes the others from their last
checkpoint; a run directory that holds another configuration is an error (choose another ``--out``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..rules.base import ConfigError
from .config import ExperimentConfig, _toml_value, apply_overrides, from_dict, read_toml


@dataclass(frozen=True)
class SweepRun:
    method: str
    label: str
    seed: int
    run_dir: Path
    config: ExperimentConfig = field(compare=False)


def slug(text: str) -> str:
    """A folder-safe form of a label: ``"K=16 het."`` → ``"K16-het"``."""
    s = re.sub(r"[^A-Za-z0-9.+-]+", "-", text.replace("=", "")).strip("-.")
    return s or "default"


def _as_override(key: str, value: Any) -> str:
    return f"{key}={_toml_value(value)}"


def plan_sweep(
    path: str | Path | None,
    *,
    out: str | Path,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    settings: list[str] | None = None,
    grid: list[str] | None = None,
) -> list[SweepRun]:
    """Expand a config (and its ``[sweep]`` section, or the command-line choices) into the list of runs."""
    data = read_toml(path) if path is not None else {}
    spec = data.pop("sweep", {}) or {}
    if not isinstance(spec, dict):
        raise ConfigError("[sweep] must be a table")
    unknown = set(spec) - {"methods", "seeds", "settings"}
    if unknown:
        raise ConfigError(f"unknown key sweep.{sorted(unknown)[0]}; [sweep] accepts: methods, seeds, settings")
    base = data
    cli = list(overrides or [])

    method_specs: list[tuple[str, list[str]]] = []
    default_method = apply_overrides(data, cli).get("method", {}).get("name", "ormo")
    for m in methods if methods is not None else spec.get("methods", [default_method]):
        if isinstance(m, str):
            method_specs.append((m, [f"method.name={_toml_value(m)}"]))
        elif isinstance(m, dict) and isinstance(m.get("name"), str):
            unknown_keys = set(m) - {"name", "label", "set"}
            if unknown_keys:
                raise ConfigError(f"sweep.methods entry {m!r}: unknown key {sorted(unknown_keys)[0]!r} "
                                  f"(accepted: name, label, set)")
            extra = [_as_override(k, v) for k, v in (m.get("set") or {}).items()]
            method_specs.append((str(m.get("label", m["name"])), [f"method.name={_toml_value(m['name'])}", *extra]))
        else:
            raise ConfigError(f"sweep.methods entries must be names or {{name = ..., label = ..., set = {{...}}}}, "
                              f"got {m!r}")
    labels_seen = [label for label, _ in method_specs]
    duplicate = next((x for x in labels_seen if labels_seen.count(x) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"sweep.methods lists {duplicate!r} twice; give each variant its own label "
                          f"({{name = \"{duplicate}\", label = \"...\", set = {{...}}}})")

    setting_specs: list[tuple[str, list[str]]] = []
    if grid:
        for item in grid:  # key=v1,v2 → one setting per value
            if "=" not in item:
                raise ConfigError(f"--grid {item!r} must look like section.key=v1,v2")
            key, values = item.split("=", 1)
            setting_specs += [(f"{key.split('.')[-1]}={v}", [f"{key}={v}"]) for v in values.split(",")]
    else:
        for s in spec.get("settings", []):
            if not isinstance(s, dict) or not isinstance(s.get("label"), str):
                raise ConfigError(f"sweep.settings entries need a label and a set table, got {s!r}")
            setting_specs.append((s["label"], [_as_override(k, v) for k, v in (s.get("set") or {}).items()]))
    if not setting_specs:
        setting_specs = [(base.get("train", {}).get("label") or "default", [])]
    if settings:
        known = [label for label, _ in setting_specs]
        missing = [s for s in settings if s not in known]
        if missing:
            raise ConfigError(f"unknown setting {missing[0]!r}; this sweep has: {', '.join(known)}")
        setting_specs = [s for s in setting_specs if s[0] in settings]

    seed_list = seeds if seeds is not None else spec.get("seeds", [base.get("train", {}).get("seed", 0)])
    out = Path(out)
    runs = []
    for label, set_over in setting_specs:
        for method, m_over in method_specs:
            for seed in seed_list:
                if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                    raise ConfigError(f"invalid sweep seed: {seed!r} (must be an integer >= 0)")
                d = apply_overrides(base, [*set_over, *m_over, *cli, f"train.seed={seed}",
                                           f"train.label={_toml_value(label)}"])
                cfg = from_dict(d)
                runs.append(SweepRun(method, label, seed, out / slug(label) / method / f"seed{seed}", cfg))
    return runs


def check_existing(run: SweepRun) -> str | None:
    """None for a fresh directory; 'finished', 'resume' or 'restart' for one that holds this configuration's run;
    an error for a directory that holds another configuration."""
    from .config import load_config, to_toml
    from .run import CHECKPOINT, read_run_info

    if not (run.run_dir / "run.json").exists():
        return None
    stored = load_config(run.run_dir / "config.toml")
    if stored != run.config:
        theirs, ours = to_toml(stored).splitlines(), to_toml(run.config).splitlines()
        diff = [line for line in ours if line not in theirs][:3]
        raise ConfigError(f"{run.run_dir} holds a run of another configuration (this sweep has: {'; '.join(diff)}); "
                          f"use another --out, or delete that directory to redo it")
    status = read_run_info(run.run_dir).get("status")
    if status == "finished":
        return "finished"
    return "resume" if (run.run_dir / CHECKPOINT).exists() else "restart"


def _run_one(run: SweepRun, threads: int) -> tuple[str, str]:
    import torch

    from .run import train

    torch.set_num_threads(threads)
    state = check_existing(run)
    if state == "finished":
        return str(run.run_dir), "skipped (finished)"
    if state == "restart":  # it failed before its first checkpoint: start it again
        (run.run_dir / "run.json").unlink()
    train(run.config, run.run_dir, resume=state == "resume", progress=False)
    return str(run.run_dir), "resumed" if state == "resume" else "done"


def run_sweep(runs: list[SweepRun], *, jobs: int = 1, progress: bool = True) -> list[tuple[str, str]]:
    """Run every planned run, ``jobs`` at a time in separate processes; returns (run_dir, outcome) pairs.
    A failing run is reported and the others go on; the sweep then raises listing the failures."""
    if jobs < 1:
        raise ConfigError(f"invalid jobs: {jobs} (must be an integer >= 1)")
    for r in runs:  # before anything starts: a directory of another configuration stops the sweep
        check_existing(r)
    if runs:
        out = runs[0].run_dir.parent.parent.parent
        out.mkdir(parents=True, exist_ok=True)
        order = {"labels": list(dict.fromkeys(r.label for r in runs)),
                 "methods": list(dict.fromkeys(r.method for r in runs))}
        (out / "sweep.json").write_text(json.dumps(order, indent=2) + "\n", encoding="utf-8")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results: list[tuple[str, str]] = []
    failures: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc="sweep", unit="run", dynamic_ncols=True)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_run_one, r, threads): r for r in runs}
        for fut in cf.as_completed(futures):
            r = futures[fut]
            try:
                results.append(fut.result())
            except Exception as e:  # keep going: one diverging or broken run must not lose the others
                failures.append(f"{r.run_dir}: {type(e).__name__}: {e}")
                results.append((str(r.run_dir), f"failed: {e}"))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(runs)} runs failed:\n" + "\n".join(failures))
    return results
