"""Sweeps: the Cartesian product settings × grid axes × methods × seeds, run in child processes, resumable.

A config file may carry a ``[sweep]`` section (ignored by ``ormo train``)::

    [sweep]
    methods = ["ormo", {name = "orlomo", label = "orlomo-H", set = {"method.options.group_decay" = "beta_pow_H"}}]
    seeds = [0, 1, 2]
    grid = {"method.lr" = [0.01, 0.03]}        # optional: every value of every axis, in every setting

    [[sweep.settings]]
    label = "K=16 hom."
    set = {"train.num_workers" = 16, "timing.model" = "homogeneous"}

Every planned run is a complete, independent config: the base file, then its setting's overrides, its method's, its
grid values', the command line's ``--set`` and finally its seed and labels, each applied to a fresh copy (nothing
one run sets can reach another). A method given as a table may carry a ``label``: its row in tables and plots and
its folder (variants of one rule need distinct labels). Each run goes to ``OUT/<setting>/<method label>/seed<k>``;
labels whose folder names would collide are an error at planning time. ``OUT/sweep.json`` accumulates the order of
the settings and methods ever run into ``OUT`` (a rerun with a subset of settings keeps the others).

Running the sweep again skips finished runs and resumes the others from their last checkpoint; a run directory that
holds another configuration is an error. Runs execute in child processes, each in its own process group: a
Ctrl-C (SIGINT) or SIGTERM to the sweep stops queueing at once and is passed to the running children exactly once,
which checkpoint at their next iteration boundary and exit; the children also get SIGTERM if the sweep process dies
(Linux), so none outlives it. The children are ``jobs`` long-lived workers (``ormo.experiment.sweep_worker``) that
run one planned run after another, so torch is imported once per worker rather than once per run.
"""

from __future__ import annotations

import collections
import ctypes
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..rules.base import ConfigError
from .config import (
    ExperimentConfig,
    _toml_value,
    apply_overrides,
    from_dict,
    load_config,
    override_key,
    parse_value,
    read_config_file,
    same_value_key,
    to_toml,
)
from .rundir import CHECKPOINT, RunDirError, RunLock, flatten, is_locked, make_run_dir, read_run_info, write_text
from .tuning import TUNING_DIR, TuneSpec, budget_overrides, candidates, parse_tune, selection


@dataclass(frozen=True)
class SweepRun:
    """One planned run: its method label (row and folder), setting label (column), seed and directory."""

    method: str
    label: str
    seed: int
    run_dir: Path
    config: ExperimentConfig = field(compare=False)
    #: the overrides that make this run's config from the base file, in the order applied (the last two are always
    #: its seed and its setting label)
    overrides: tuple[str, ...] = field(compare=False, default=())
    #: the sweep's tuning protocol, if it tunes (the config then lacks the tuned values until they are chosen)
    tune: TuneSpec | None = field(compare=False, default=None)
    #: the base config's data (the file without [sweep]), from which a tuned config is rebuilt
    base: Any = field(compare=False, default=None, repr=False)
    #: the base config with the command line's --set, as TOML: what every run of a sweep folder shares
    base_toml: str = field(compare=False, default="", repr=False)


def slug(text: str) -> str:
    """A folder-safe form of a label: ``"K=16 het."`` → ``"K16-het"``."""
    s = re.sub(r"[^A-Za-z0-9.+-]+", "-", text.replace("=", "")).strip("-.")
    return s or "default"


#: keys a sweep sets itself: the method (``[sweep] methods``/``--methods``), its label, the seed and the setting label
OWNED_KEYS: dict[str, str] = {
    "method.name": "list methods in [sweep] methods (or --methods)",
    "method.label": "give a method entry a label: {name = ..., label = ..., set = {...}}",
    "train.seed": "list seeds in [sweep] seeds (or --seeds)",
    "train.label": "the setting's label is its [[sweep.settings]] label (and grid values)",
}


#: keys the tuning protocol itself relies on, refused as candidates
NOT_TUNABLE: dict[str, str] = {
    "train.eval_test": "tuning runs never read the test split (they set it to false) and the real runs report it; "
                       "set it in the config",
    "data.validation": "the candidates are scored on this hold-out, so every candidate must be scored on the same "
                       "one; set it in the config",
}


def _check_not_owned(where: str, overrides: list[str], owned: tuple[str, ...] = tuple(OWNED_KEYS)) -> None:
    """A key the sweep sets for each run would be silently replaced: refuse it where it cannot take effect."""
    for item in overrides:
        key = override_key(item)  # "train . seed" sets train.seed too
        if key in owned:
            raise ConfigError(f"{where} sets {key}, which the sweep sets for each run (so it would be ignored or "
                              f"would mislabel runs); {OWNED_KEYS[key]}")


def _as_override(where: str, key: Any, value: Any) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"{where}: key {key!r} must be a string like \"method.lr\"")
    if isinstance(value, dict):
        inner = next(iter(value), "key")
        raise ConfigError(f"{where}: {key} = {value!r} is a table, not a value; quote dotted keys, e.g. "
                          f"{{\"{key}.{inner}\" = ...}} (TOML reads {{{key}.{inner} = ...}} as a nested table)")
    try:
        return f"{override_key(key)}={_toml_value(value)}"
    except TypeError:
        raise ConfigError(f"{where}: {key} = {value!r} is not a value ormo can set") from None


def _table_overrides(where: str, table: Any) -> list[str]:
    if table is None:
        return []
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: set must be a table of overrides like {{\"method.lr\" = 0.05}}, got {table!r}")
    return [_as_override(where, k, v) for k, v in table.items()]


def _check_slugs(kind: str, labels: list[str]) -> None:
    """Distinct labels must give distinct folders (``"K=4 het."`` and ``"K4 het"`` both give ``K4-het``)."""
    seen: dict[str, str] = {}
    for label in labels:
        if label in seen.values():
            raise ConfigError(f"sweep {kind} label {label!r} is given twice; give each its own label")
        other = seen.get(slug(label))
        if other is not None:
            raise ConfigError(f"sweep {kind} labels {other!r} and {label!r} would share the folder {slug(label)!r}; "
                              f"make them differ in letters or digits")
        seen[slug(label)] = label


#: files a sweep writes into its --out folder, next to the settings' folders (plots are ``<setting>.png``)
SWEEP_FILES = ("sweep.json", "tuning.md", "table.md", "table.csv")


def _check_not_a_sweep_file(labels: list[str]) -> None:
    """A setting's folder must not be a file the sweep writes next to it: its runs, or the table or plots, would
    fail at the end of the sweep."""
    for label in labels:
        folder = slug(label)
        if folder in SWEEP_FILES or folder.lower().endswith(".png"):
            what = "plots (<setting>.png)" if folder.lower().endswith(".png") else f"file {folder}"
            raise ConfigError(f"sweep setting label {label!r} would put its runs in the folder {folder!r}, the name of "
                              f"the sweep's own {what} in --out; choose another label")


def _grid_axes(spec_grid: Any, cli_grid: list[str] | None) -> dict[str, list[str]]:
    """Grid axes as key → list of TOML value texts: ``[sweep.grid]`` first, then ``--grid`` flags (a flag for a key
    the config already sweeps replaces that axis)."""
    axes: dict[str, list[str]] = {}
    if spec_grid is not None:
        if not isinstance(spec_grid, dict):
            raise ConfigError(f"sweep.grid must be a table like {{\"method.lr\" = [0.01, 0.03]}}, got {spec_grid!r}")
        for key, values in spec_grid.items():
            key = override_key(key) if isinstance(key, str) else key  # "method . lr" is method.lr, one axis
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.grid.{key}: expected a non-empty list of values, got {values!r}")
            if key in axes:  # "method.lr" and "method . lr": one key spelled twice, one axis would be dropped
                raise ConfigError(f"sweep.grid sets {key} twice (spelled differently); list its values once")
            axes[key] = [_as_override(f"sweep.grid.{key}", key, v).split("=", 1)[1] for v in values]
    flagged: dict[str, str] = {}
    for item in cli_grid or []:
        key, sep, values = item.partition("=")
        texts = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not any(texts):
            raise ConfigError(f"--grid {item!r} must look like section.key=v1,v2 (e.g. method.lr=0.01,0.03)")
        if not all(texts):  # "0.1,,0.2": a value left out by mistake is not dropped silently
            raise ConfigError(f"--grid {item!r} has an empty value between commas; list each value once, "
                              f"e.g. {key.strip()}=0.01,0.03")
        key = override_key(key)
        if key in flagged:  # the first flag would be dropped without a word
            raise ConfigError(f"--grid {key} is given twice ({flagged[key]!r} and {item!r}); list every value in one "
                              f"flag, e.g. --grid {key}={','.join(axes[key] + texts)}")
        flagged[key] = item
        axes[key] = texts
    for key, texts in axes.items():
        _check_not_owned(f"grid axis {key}", [f"{key}=x"])
        values = [same_value_key(parse_value(t)) for t in texts]  # 0.1 and 1e-1, 1 and 1.0 are one value
        if len(set(values)) != len(values):
            raise ConfigError(f"grid axis {key} lists a value twice: {', '.join(texts)}")
    return axes


#: the most runs one plan may hold: a grid typed by mistake (2 × 1000 × 1000) is refused before it is expanded
MAX_PLANNED_RUNS = 100_000


def _grid_points(axes: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """(label part, overrides) for every point of the product of the axes; one empty point without axes."""
    short = {key: key.split(".")[-1] for key in axes}
    names = {key: short[key] if list(short.values()).count(short[key]) == 1 else key for key in axes}
    points: list[tuple[str, list[str]]] = [("", [])]
    for key, texts in axes.items():
        points = [(f"{label} {names[key]}={text}".strip(), [*over, f"{key}={text}"])
                  for label, over in points for text in texts]
    return points


def plan_sweep(
    path: str | Path | None,
    *,
    out: str | Path,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    settings: list[str] | None = None,
    grid: list[str] | None = None,
    tune_scope: str | None = None,
) -> list[SweepRun]:
    """Expand a config (its ``[sweep]`` section, or the command-line choices) into the list of planned runs."""
    if path is None:
        raise ConfigError("a sweep needs a CONFIG file with the base settings (e.g. configs/quickstart.toml, or a "
                          "preset: `ormo presets` lists them)")
    data = read_config_file(path)
    spec = data.pop("sweep", {}) or {}
    if not isinstance(spec, dict):
        raise ConfigError("[sweep] must be a table")
    unknown = set(spec) - {"methods", "seeds", "settings", "grid", "tune"}
    if unknown:
        raise ConfigError(f"unknown key sweep.{sorted(unknown)[0]}; [sweep] accepts: methods, seeds, settings, grid, "
                          f"tune")
    tune = parse_tune(spec.get("tune"), scope=tune_scope, as_override=_as_override, parse_value=parse_value)
    base = data
    cli = list(overrides or [])
    base_cfg = from_dict(apply_overrides(base, cli))  # the base must be valid on its own: errors name it first

    method_specs: list[tuple[str, list[str]]] = []
    method_list = methods if methods is not None else spec.get("methods", [base_cfg.method.name])
    if not isinstance(method_list, list) or not method_list:
        raise ConfigError(f"sweep.methods must be a non-empty list of rule names or tables, got {method_list!r}")
    for m in method_list:
        if isinstance(m, str):
            name, label, extra = m, m, []
        elif isinstance(m, dict) and isinstance(m.get("name"), str):
            unknown_keys = set(m) - {"name", "label", "set"}
            if unknown_keys:
                raise ConfigError(f"sweep.methods entry {m!r}: unknown key {sorted(unknown_keys)[0]!r} "
                                  f"(accepted: name, label, set)")
            name, label = m["name"], m.get("label", m["name"])
            if not isinstance(label, str) or not label.strip():
                raise ConfigError(f"sweep.methods entry {m!r}: label must be a non-empty string")
            extra = _table_overrides(f"sweep.methods entry {label!r}", m.get("set"))
            _check_not_owned(f"sweep.methods entry {label!r}", extra)
        else:
            raise ConfigError(f"sweep.methods entries must be names or {{name = ..., label = ..., set = {{...}}}}, "
                              f"got {m!r}")
        method_specs.append((label, [f"method.name={_toml_value(name)}", *extra,
                                     f"method.label={_toml_value(label)}"]))
    labels_seen = [label for label, _ in method_specs]
    duplicate = next((x for x in labels_seen if labels_seen.count(x) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"sweep.methods lists {duplicate!r} twice; give each variant its own label "
                          f"({{name = \"{duplicate}\", label = \"...\", set = {{...}}}})")
    _check_slugs("method", labels_seen)

    setting_specs: list[tuple[str, list[str]]] = []
    raw_settings = spec.get("settings", [])
    if not isinstance(raw_settings, list):
        raise ConfigError(f"sweep.settings must be a list of {{label = ..., set = {{...}}}} tables, "
                          f"got {raw_settings!r}")
    for s in raw_settings:
        if not isinstance(s, dict) or not isinstance(s.get("label"), str) or not s["label"].strip():
            raise ConfigError(f"sweep.settings entries need a label and a set table, got {s!r}")
        extra_keys = sorted(set(s) - {"label", "set"})
        if extra_keys:
            raise ConfigError(f"sweep.settings entry {s['label']!r}: unknown key {extra_keys[0]!r} "
                              f"(accepted: label, set)")
        own = _table_overrides(f"sweep.settings entry {s['label']!r}", s.get("set"))
        _check_not_owned(f"sweep.settings entry {s['label']!r}", own)
        setting_specs.append((s["label"], own))
    _check_slugs("setting", [label for label, _ in setting_specs])
    if settings:
        known = [label for label, _ in setting_specs]
        missing = [s for s in settings if s not in known]
        if missing:
            raise ConfigError(f"unknown setting {missing[0]!r}; this sweep has: {', '.join(known) or 'no settings'}")
        setting_specs = [s for s in setting_specs if s[0] in settings]
    implicit = not setting_specs
    if implicit:
        setting_specs = [(base_cfg.train.label or "default", [])]

    axes = _grid_axes(spec.get("grid"), grid)
    owned = ["method.label"]  # keys of the command line the sweep would overwrite: refused, never ignored
    owned += ["method.name"] if methods is not None or "methods" in spec else []
    owned += ["train.seed"] if seeds is not None or "seeds" in spec else []
    owned += ["train.label"] if raw_settings or axes else []
    _check_not_owned("--set", cli, tuple(owned))
    if tune is not None:  # a tuned key set anywhere else would be silently replaced by the chosen value
        for key in tune.keys:
            _check_not_owned(f"sweep.tune.grid.{key}", [f"{key}=x"])
            if key in NOT_TUNABLE:
                raise ConfigError(f"sweep.tune.grid.{key} cannot be tuned: {NOT_TUNABLE[key]}")
            setters = [("--set", cli), ("sweep.grid", [f"{k}=x" for k in axes])]
            setters += [(f"sweep.settings entry {label!r}", over) for label, over in setting_specs]
            setters += [(f"sweep.methods entry {label!r}", over) for label, over in method_specs]
            for where, over in setters:
                if any(override_key(item) == key for item in over):
                    raise ConfigError(f"{where} sets {key}, which sweep.tune.grid tunes (the chosen value would "
                                      f"replace it); tune it or set it, not both")
        if tune.scope == "shared" and tune.reference is None and methods is not None and \
                set(labels_seen) != {m if isinstance(m, str) else m.get("label", m.get("name"))
                                     for m in spec.get("methods", []) if isinstance(m, str | dict)}:
            raise ConfigError("--methods: with sweep.tune scope \"shared\" and no reference, one value per setting is "
                              "chosen over all of the sweep's methods, so they run together: list them in [sweep] "
                              "methods and leave --methods out (or set sweep.tune.reference, or use scope \"method\")")
        if tune.reference is not None and tune.reference not in labels_seen:
            raise ConfigError(f"sweep.tune.reference {tune.reference!r} is not one of this sweep's methods: "
                              f"{', '.join(labels_seen)}")
    sizes = [len(setting_specs), *(len(texts) for texts in axes.values()), len(method_specs)]
    seed_count = len(seeds) if seeds is not None else len(spec.get("seeds", [0])) \
        if isinstance(spec.get("seeds", [0]), list) else 1
    total = math.prod([*sizes, seed_count])
    if total > MAX_PLANNED_RUNS:
        raise ConfigError(f"the sweep would plan {total:,} runs ({' × '.join(str(n) for n in [*sizes, seed_count])}: "
                          f"settings × grid axes × methods × seeds), more than {MAX_PLANNED_RUNS:,}; shorten the grid "
                          f"or the lists, or split the sweep")
    if tune is not None:  # its runs count too: every candidate × tuning seed of each cell (at most)
        tuning = [*sizes, *(len(texts) for _, texts in tune.axes), len(tune.seeds)]
        if total + math.prod(tuning) > MAX_PLANNED_RUNS:
            raise ConfigError(f"the sweep would plan {total:,} runs and up to {math.prod(tuning):,} tuning runs "
                              f"({' × '.join(str(n) for n in tuning)}: settings × grid axes × methods × candidates "
                              f"per tuned key × tuning seeds), more than {MAX_PLANNED_RUNS:,} in all; shorten "
                              f"sweep.tune.grid or its seeds, or split the sweep")
        _check_slugs("tuning candidate", [label for label, _ in candidates(tune)])
    points = _grid_points(axes)
    cells: list[tuple[str, list[str], list[str]]] = []  # (label, setting overrides, grid overrides)
    for label, set_over in setting_specs:
        for part, grid_over in points:
            full = part if implicit and part else f"{label} {part}".strip()
            cells.append((full, set_over, grid_over))
    _check_slugs("setting", [label for label, _, _ in cells])
    _check_not_a_sweep_file([label for label, _, _ in cells])

    seed_list = seeds if seeds is not None else spec.get("seeds", [base_cfg.train.seed])
    if not isinstance(seed_list, list) or not seed_list:
        raise ConfigError(f"sweep.seeds must be a non-empty list of integers >= 0, got {seed_list!r}")
    for seed in seed_list:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"invalid sweep seed: {seed!r} (must be an integer >= 0)")
    if len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"sweep seeds list a seed twice: {seed_list}")

    out = Path(out)
    if (out / "run.json").exists():  # ormo table OUT would then show that one run, never the sweep's own
        raise ConfigError(f"--out {out} is a run directory (it holds run.json), not a sweep folder: its table would "
                          f"show that run alone; choose another --out")
    runs = []
    for label, set_over, grid_over in cells:
        for method, m_over in method_specs:
            for seed in seed_list:
                own = (*set_over, *m_over, *grid_over, *cli, f"train.seed={seed}",
                       f"train.label={_toml_value(label)}")
                try:
                    cfg = from_dict(apply_overrides(base, list(own)))
                except ConfigError as e:
                    raise ConfigError(f"setting {label!r}, method {method!r}: {e}") from None
                runs.append(SweepRun(method, label, seed, out / slug(label) / slug(method) / f"seed{seed}", cfg,
                                     tuple(own), tune=tune, base=base, base_toml=to_toml(base_cfg)))
    if tune is not None:
        plan_tuning(runs)  # every tuning run's config must be valid before anything starts
    return runs


def plan_tuning(runs: list[SweepRun]) -> list[SweepRun]:
    """The tuning runs of a tuned plan: every candidate × tuning seed of each (setting, method) cell (with scope
    ``shared`` and a reference: of the reference method's cells alone), into ``OUT/.tuning``."""
    tuning: list[SweepRun] = []
    seen: set[tuple[str, str]] = set()
    for r in runs:
        spec = r.tune
        if spec is None or (r.label, r.method) in seen:
            continue
        seen.add((r.label, r.method))
        if spec.scope == "shared" and spec.reference is not None and r.method != spec.reference:
            continue
        cell = r.overrides[:-2]  # the cell's own overrides (the last two are its seed and its setting label)
        for cand, cand_over in candidates(spec):
            label_over = f"train.label={_toml_value(f'{r.label} {cand}')}"  # `ormo table OUT/.tuning` tells them apart
            # the budget scales the candidate's own epochs and schedule (a candidate may tune them)
            shortened = budget_overrides(from_dict(apply_overrides(r.base, [*cell, *cand_over])), spec.budget) \
                if spec.budget != 1.0 else ()
            for seed in spec.seeds:
                own = (*cell, *cand_over, *shortened, *spec.extra, "train.eval_test=false", f"train.seed={seed}",
                       label_over)
                try:
                    cfg = from_dict(apply_overrides(r.base, list(own)))
                except ConfigError as e:
                    raise ConfigError(f"tuning run of setting {r.label!r}, method {r.method!r}, {cand}: {e}") from None
                key = selection(spec.metric)[0]
                if key.startswith("val") and cfg.task.entry is None and cfg.data.validation is None:
                    raise ConfigError(f"sweep.tune.metric = {spec.metric!r} is measured on the validation split, "
                                      f"which setting {r.label!r}, method {r.method!r} does not hold out: set "
                                      f"data.validation (e.g. 5000), or choose metric = \"final_train_loss\"")
                run_dir = (sweep_root([r]) / TUNING_DIR / slug(r.label) / slug(r.method) / slug(cand) / f"seed{seed}")
                tuning.append(SweepRun(r.method, r.label, seed, run_dir, cfg, own))
    return tuning


def tuned_runs(runs: list[SweepRun], choices: list) -> tuple[list[SweepRun], list[SweepRun]]:
    """The planned runs with their cell's chosen values applied, and the runs whose cell has no choice (every
    candidate diverged)."""
    from .tuning import choice_for

    ready, orphans = [], []
    for r in runs:
        if r.tune is None:
            ready.append(r)
            continue
        choice = choice_for(choices, r.label, r.method)
        if choice.chosen is None:
            orphans.append(r)
            continue
        own = (*r.overrides[:-2], *choice.overrides, *r.overrides[-2:])
        cfg = from_dict(apply_overrides(r.base, list(own)))
        ready.append(SweepRun(r.method, r.label, r.seed, r.run_dir, cfg, own))
    return ready, orphans


# ---------------------------------------------------------------------------------------------------------------
# showing a plan


def config_diff(base: ExperimentConfig, cfg: ExperimentConfig) -> list[str]:
    """``key = value (base: value)`` for every resolved value of ``cfg`` that differs from ``base``."""
    a, b = flatten(base.to_dict()), flatten(cfg.to_dict())
    lines = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            new = "unset" if b.get(key) is None else _toml_value(b[key])
            old = "unset" if a.get(key) is None else _toml_value(a[key])
            lines.append(f"{key} = {new}   (base: {old})")
    return lines


def describe_plan(runs: list[SweepRun], base: ExperimentConfig, *, full: bool = False,
                  rest: list[SweepRun] | None = None) -> str:
    """The plan as text: each run's directory, what is already there, and its resolved config's difference from the
    base config (``full``: its whole resolved config). ``rest``: as for :func:`run_sweep`."""
    labels = list(dict.fromkeys(r.label for r in runs))
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    lines = [f"# {len(runs)} runs = {len(labels)} settings × {len(methods)} methods × {len(seeds)} seeds"]
    tuning = plan_tuning(runs)
    pending = False
    if tuning:
        spec = runs[0].tune
        assert spec is not None
        lines[0] += (f", after {len(tuning)} tuning runs choosing {', '.join(spec.keys)} by {spec.metric} on the "
                     f"validation split (scope {spec.scope})")
        try:
            done = all(check_existing(t) == "finished" for t in tuning)
        except ConfigError:
            done = False
        if done:  # the choice is known: show the real runs as they will run
            try:
                runs, orphans = tuned_runs(runs, choose_tuned(runs, tuning)[1])
            except ConfigError as e:  # a damaged tuning run: the sweep itself will say so
                done, orphans = False, []
                lines[0] += f" (cannot score: {e})"
        if done:
            lines[0] += "; tuning is finished, the real runs below carry the chosen values"
            lines += [f"{r.run_dir}   [not run: no tuning candidate has a score]" for r in orphans]
        else:
            pending = True
            lines[0] += "; the real runs below get the chosen values once tuning has finished"
    try:
        check_other_seeds(runs)
        check_rest(runs, rest)
        check_base(runs, rest)
    except ConfigError as e:
        lines.append(f"# THE SWEEP WILL REFUSE THIS PLAN: {e}")
    for r in [*tuning, *runs]:
        if pending and r.tune is not None:
            lines.append(f"{r.run_dir}   [waits for tuning; shown with the base values]")
            lines += ["    " + x for x in (to_toml(r.config).splitlines() if full else config_diff(base, r.config))
                      if x]
            continue
        try:
            state = check_existing(r) or "new"
            if state != "new" and is_locked(r.run_dir):
                state = "in use by another process now"
        except ConfigError:
            state = "ANOTHER CONFIGURATION IS THERE (the sweep will refuse it)"
        lines.append(f"{r.run_dir}   [{state}]")
        if full:
            lines += ["    " + x for x in to_toml(r.config).splitlines() if x]
        else:
            lines += ["    " + x for x in config_diff(base, r.config)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# running


def _differs_there(stored: ExperimentConfig, cfg: ExperimentConfig) -> str:
    """How ``cfg`` (this sweep's) differs from ``stored`` (a run's on disk): its first three keys, the value there."""
    return "; ".join(d.replace("(base:", "(there:") for d in config_diff(stored, cfg)[:3])


def check_existing(run: SweepRun) -> str | None:
    """None for a fresh directory; 'finished', 'resume' or 'restart' for one that holds this configuration's run;
    an error for a directory that holds another configuration."""
    if not (run.run_dir / "run.json").exists():
        return None
    try:
        stored = load_config(run.run_dir / "config.toml")
    except ConfigError as e:
        raise ConfigError(f"{run.run_dir} holds a run whose config.toml cannot be read ({e}); delete that "
                          f"directory to redo it") from None
    if stored != run.config:
        raise ConfigError(f"{run.run_dir} holds a run of another configuration (this sweep has: "
                          f"{_differs_there(stored, run.config)}); use another --out, or delete that directory to "
                          f"redo it")
    try:
        status = read_run_info(run.run_dir).get("status")
    except (OSError, ValueError, RuntimeError):  # an unreadable run.json: its checkpoint decides
        status = None
    if status == "finished":
        return "finished"
    return "resume" if (run.run_dir / CHECKPOINT).exists() else "restart"


def check_other_seeds(runs: list[SweepRun], *, rest: bool = False) -> None:
    """Refuse a plan whose (setting, method) folder already holds runs of seeds it does not plan, made with a config
    that differs from the planned one in anything but ``train.seed`` (another ``--set``, an edited sweep file, another
    tuned choice): the table would average the two experiments in one cell. Runs whose config.toml cannot be read
    are left to the table, which skips them with a warning.

    With ``rest``, ``runs`` are the cells of the sweep that this command does not run (``--settings`` or
    ``--methods`` chose others), and every run found in them is compared: the folder's table would otherwise put
    columns or rows of an older configuration beside the new ones. A tuned one must have one of the tune's candidates
    (its value was chosen when it ran)."""
    from dataclasses import replace

    planned = set() if rest else {r.run_dir for r in runs}
    seen: set[Path] = set()
    for r in runs:
        cell = r.run_dir.parent
        if cell in seen or r.tune is not None and not rest:  # a tuned run is checked once its values are chosen
            continue
        seen.add(cell)
        wanted: list[ExperimentConfig] | None = None  # what its runs may be: built when the cell holds one
        for info in sorted(cell.glob("seed*/run.json")):
            other = info.parent
            if other in planned:
                continue
            try:
                stored = load_config(other / "config.toml")
            except ConfigError:
                continue
            stored = replace(stored, train=replace(stored.train, seed=r.config.train.seed))
            if wanted is None:  # a tuned cell not run now: one of the tune's candidates (its choice was made then)
                wanted = [r.config] if r.tune is None else _candidate_configs(r)
            if stored not in wanted:
                near = min(wanted, key=lambda c: len(config_diff(stored, c))) if wanted else r.config
                diff = _differs_there(stored, near)
                if rest:
                    raise ConfigError(f"{other} holds a run of setting {r.label!r}, method {r.method!r} made with "
                                      f"another configuration than this sweep now gives it (now: {diff}), so the "
                                      f"table of {sweep_root(runs)} would mix the two; use another --out, or delete "
                                      f"those runs and run that setting and method again")
                raise ConfigError(f"{other} holds a run of setting {r.label!r}, method {r.method!r} whose config "
                                  f"differs from this sweep's in more than the seed (this sweep has: {diff}), so one "
                                  f"table cell would mix the two; use another --out, or delete those runs")


def _candidate_configs(r: SweepRun) -> list[ExperimentConfig]:
    """The configs a tuned run can get: one per candidate of its tune (as :func:`tuned_runs` builds them)."""
    configs = []
    for _, over in candidates(r.tune):
        try:
            configs.append(from_dict(apply_overrides(r.base, [*r.overrides[:-2], *over, *r.overrides[-2:]])))
        except ConfigError:  # a candidate that does not make a valid config is never chosen
            pass
    return configs


def check_rest(runs: list[SweepRun], rest: list[SweepRun] | None) -> None:
    """With a plan that is part of a sweep (``rest``, the whole of it): refuse runs of its other cells that were made
    with another configuration than the sweep now gives them (:func:`check_other_seeds` with ``rest``)."""
    if rest and runs:
        cells = {r.run_dir.parent for r in runs}
        check_other_seeds([r for r in rest if r.run_dir.parent not in cells], rest=True)


def check_base(runs: list[SweepRun], rest: list[SweepRun] | None = None) -> None:
    """``OUT/sweep.json`` records the base config (the file without [sweep], with --set) of the sweeps into OUT. A
    plan on another base is refused while OUT holds runs that no check of this plan compares (cells of a method
    given by --methods or a --grid point that this config does not plan): the table would put them beside runs of
    the new base."""
    if not runs or not runs[0].base_toml:
        return
    out = sweep_root(runs)
    try:
        old = json.loads((out / "sweep.json").read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError, AttributeError):
        return  # none recorded (a new folder, or one from before bases were): nothing to compare
    new = runs[0].base_toml
    if not isinstance(old, str) or old == new:
        return
    checked = {r.run_dir.parent for r in [*runs, *(rest or [])]}
    unchecked = sorted(p.parent for p in out.glob("*/*/seed*/run.json") if p.parent.parent not in checked)
    if not unchecked:
        return
    import tomllib

    try:
        diff = _differs_there(from_dict(tomllib.loads(old)), from_dict(tomllib.loads(new)))
    except (ValueError, ConfigError):
        diff = "the recorded base cannot be read"
    raise ConfigError(f"{unchecked[0]} was made by a sweep into {out} on another base config than this one (this "
                      f"sweep has: {diff}), so the folder's table would mix the two; use another --out, or delete "
                      f"the runs of the old base")


def sweep_root(runs: list[SweepRun]) -> Path:
    """The ``--out`` folder of a plan (``OUT/<setting>/<method>/seed<k>``)."""
    return runs[0].run_dir.parent.parent.parent


def record_plan(out: Path, runs: list[SweepRun]) -> None:
    """Add this plan's settings and methods to ``OUT/sweep.json``, after those already recorded there (a rerun with
    a subset of the settings must not hide the others from ``ormo table OUT``)."""
    path = out / "sweep.json"
    order: dict[str, list[str]] = {"labels": [], "methods": []}
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old, dict):
                data = old
                order = {k: [x for x in old.get(k, []) if isinstance(x, str)] if isinstance(old.get(k), list)
                         else [] for k in order}
        except (OSError, ValueError):
            pass  # unreadable: rebuilt from this plan (ormo table also shows every run it finds)
    order["labels"] = list(dict.fromkeys([*order["labels"], *(r.label for r in runs)]))
    order["methods"] = list(dict.fromkeys([*order["methods"], *(r.method for r in runs)]))
    base = {"base": runs[0].base_toml} if runs and runs[0].base_toml else {}
    write_text(path, json.dumps({**data, **order, **base}, indent=2) + "\n")


class SweepStopped(KeyboardInterrupt):
    """A sweep stopped by SIGINT or SIGTERM; ``signum`` is the signal, ``results`` the (run_dir, outcome) pairs."""

    def __init__(self, signum: int, results: list[tuple[str, str]], not_started: int) -> None:
        super().__init__(signum)
        self.signum, self.results, self.not_started = signum, results, not_started

    def __str__(self) -> str:
        counts = collections.Counter(o.split(" ")[0].rstrip(":") for _, o in self.results)
        done = counts["done"] + counts["resumed"] + counts["skipped"]
        return (f"stopped by {signal.Signals(self.signum).name}: {done} runs finished, {counts['stopped']} stopped at "
                f"a checkpoint, {counts['failed']} failed, {self.not_started + counts['not']} not started; run the "
                f"same command again to continue")


class SweepFailed(RuntimeError):
    """Some runs of a sweep failed (the others ran to the end); ``results`` holds every (run_dir, outcome)."""

    def __init__(self, failures: list[str], total: int, results: list[tuple[str, str]], *, note: str = "") -> None:
        super().__init__(f"{len(failures)} of {total} runs failed" + (f" ({note})" if note else "") + ":\n"
                         + "\n".join(failures))
        self.results, self.failures = results, failures


_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to send SIGTERM to the child when the sweep process dies, even by SIGKILL (survives exec)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class _Worker:
    """A long-lived ``python -m ormo.experiment.sweep_worker`` child: it runs the jobs sent on its stdin one after
    another (torch is imported once per worker, not once per run) and answers each with a JSON line. It lives in its
    own process group, so a terminal's Ctrl-C reaches only the sweep, which passes it on exactly once."""

    def __init__(self, threads: int, replies: queue.Queue, gpu: int | None = None) -> None:
        self.run: SweepRun | None = None
        self.state: str | None = None
        self.gpu = gpu  # the one GPU it sees (CUDA_VISIBLE_DEVICES), or None: the parent's view
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ORMO_SWEEP_THREADS": str(threads)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = _visible_device(gpu)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ormo.experiment.sweep_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, env=env, text=True, encoding="utf-8", process_group=0,
            preexec_fn=_child_setup if sys.platform.startswith("linux") else None)
        threading.Thread(target=self._read, args=(replies,), daemon=True).start()

    def _read(self, replies: queue.Queue) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            replies.put((self, line))
        replies.put((self, None))  # the worker exited

    def start(self, run: SweepRun, state: str | None, plan_dir: Path) -> None:
        self.run, self.state = run, state
        if state == "restart":  # it failed before its first checkpoint: start it again
            (run.run_dir / "run.json").unlink(missing_ok=True)
        config = None
        if state != "resume":
            with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=plan_dir, delete=False, encoding="utf-8") as f:
                f.write(to_toml(run.config))
            config = f.name
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"config": config, "run_dir": str(run.run_dir),
                                          "resume": state == "resume"}) + "\n")
        self.proc.stdin.flush()

    def finish(self, line: str | None) -> tuple[str, list[str]]:
        """The outcome of the current run from the worker's reply (None: it exited without one) and its warnings."""
        if line is not None:
            reply = json.loads(line)
            self.run = None
            return str(reply["outcome"]), [str(w) for w in reply.get("warnings", [])]
        run, self.run = self.run, None
        assert run is not None
        self.proc.wait()
        self.stderr.seek(0)
        lines = [x.rstrip() for x in self.stderr.read().splitlines() if x.strip()]
        try:  # it died without answering: the run directory says how far it got
            status = read_run_info(run.run_dir).get("status")
        except (OSError, ValueError, RuntimeError):  # missing or unreadable run.json
            status = None
        if status == "finished":
            return ("resumed" if self.state == "resume" else "done"), []
        if status == "interrupted" or self.proc.returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM):
            return "stopped (checkpointed; rerun to continue)", []
        return f"failed: the worker process died (exit status {self.proc.returncode}): " + \
            (lines[-1] if lines else "no message"), []

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


def gpu_slots(runs: list[SweepRun], runs_per_device: int | None, *, visible: int | None = None,
              jobs: int | None = None) -> list[int] | None:
    """The GPU of each worker slot when the runs train on CUDA (``train.device = "cuda"``): every visible GPU
    ``runs_per_device`` times (default 1), so that ``jobs`` = len(slots) runs fill them; None for CPU runs. A worker
    sees only its GPU (CUDA_VISIBLE_DEVICES), so "cuda" means that one. ``visible``: the GPU count (default torch's)."""
    if runs_per_device is not None and (isinstance(runs_per_device, bool) or not isinstance(runs_per_device, int)
                                        or runs_per_device < 1):
        raise ConfigError(f"invalid --runs-per-device: {runs_per_device!r} (must be an integer >= 1)")
    devices = {r.config.train.device for r in runs}
    if not any(d.startswith("cuda") for d in devices):
        if runs_per_device is not None:
            raise ConfigError(f"--runs-per-device {runs_per_device}: the runs train on {', '.join(sorted(devices))}, "
                              f"not on a GPU; set train.device = \"cuda\" (--set train.device=cuda) or leave it out")
        return None
    if devices != {"cuda"}:  # an explicit cuda:N (or a mix with cpu) is the user's placement: kept as written
        if runs_per_device is not None:
            raise ConfigError(f"--runs-per-device {runs_per_device}: the runs name devices {sorted(devices)}; it "
                              f"spreads runs whose train.device is \"cuda\" over every GPU, so use that")
        return None
    if visible is None:
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < 1:
        raise ConfigError('train.device = "cuda" but this machine has no usable CUDA GPU: run with '
                          '--set train.device=cpu, or on a machine with one')
    per = runs_per_device or (-(-jobs // visible) if jobs else 1)  # --jobs alone: that many runs, spread evenly
    return [g for _ in range(per) for g in range(visible)]


def sweep_jobs(runs: list[SweepRun], jobs: int | None, runs_per_device: int | None, *,
               default: int = 1) -> tuple[int, list[int] | None]:
    """How many runs go at a time, and each worker slot's GPU (None for CPU runs): ``jobs`` (None: one per GPU slot,
    else ``default``), never more than the slots."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConfigError(f"invalid jobs: {jobs!r} (must be an integer >= 1)")
    slots = gpu_slots(runs, runs_per_device, jobs=jobs)
    if slots is None:
        return (default if jobs is None else jobs), None
    return min(jobs or len(slots), len(slots)), slots


def run_sweep(runs: list[SweepRun], *, jobs: int | None = 1, progress: bool = True,
              runs_per_device: int | None = None, rest: list[SweepRun] | None = None) -> list[tuple[str, str]]:
    """Run every planned run, ``jobs`` at a time in worker child processes; returns (run_dir, outcome) pairs in
    completion order. A failing run is reported and the others go on; the sweep then raises ``SweepFailed``.
    SIGINT/SIGTERM stop it as the module docstring says, raising ``SweepStopped``. ``rest``: the whole sweep the config
    describes, when ``runs`` is part of it (``--settings``, ``--methods``); runs already in its other cells must have
    been made with the configuration it gives them (:func:`check_other_seeds`).

    Runs on CUDA are spread over every visible GPU, ``runs_per_device`` at a time on each (:func:`gpu_slots`);
    ``jobs`` (None: one per slot) then caps the total."""
    jobs, slots = sweep_jobs(runs, jobs, runs_per_device)
    tuning = plan_tuning(runs)
    for r in [*tuning, *(r for r in runs if r.tune is None)]:  # before anything starts: a directory of another
        check_existing(r)                                      # configuration stops the sweep
    check_other_seeds(runs)  # and so do runs of other seeds of a planned cell, made with another configuration
    check_rest(runs, rest)  # and runs of the cells not run now, made before the config changed
    if not runs:
        return []
    out = sweep_root(runs)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder: choose another --out")
    make_run_dir(out)
    with RunLock(out):  # one sweep per folder: a second one gets an error naming this one's pid
        check_base(runs, rest)  # and so do runs of cells it cannot re-plan, made on another base
        record_plan(out, runs)
        if not tuning:
            return _run_all(runs, jobs=jobs, progress=progress, slots=slots)
        check_tuning_metric(runs, tuning)
        try:
            results = _run_all(tuning, jobs=jobs, progress=progress, desc="tuning", slots=slots)
        except SweepFailed as e:
            raise SweepFailed([f"{x} (tuning run)" for x in e.failures], len(tuning), e.results,
                              note="no real run started: fix the cause and rerun; finished tuning runs are kept"
                              ) from None
        spec, choices = choose_tuned(runs, tuning)
        finals, orphans = tuned_runs(runs, choices)
        for r in finals:  # a folder holding another configuration is refused before anything is recorded
            check_existing(r)
        check_other_seeds(finals)  # the same for finished runs of other seeds (e.g. at the old choice)
        record_tuning(runs, spec, choices)
        try:
            results += _run_all(finals, jobs=jobs, progress=progress, slots=slots)
        except SweepFailed as e:
            results += e.results
            failures = e.failures
        else:
            failures = []
        failures += [f"{r.run_dir}: not run: every tuning candidate diverged or has no score" for r in orphans]
        if failures:
            raise SweepFailed(failures, len(tuning) + len(runs), results)
        return results


def choose_tuned(runs: list[SweepRun], tuning: list[SweepRun]) -> tuple[TuneSpec, list]:
    """Score the finished tuning runs and choose (nothing is written); returns the spec with its direction resolved
    (the direction the task declares for the metric, from a tuning run's run.json, wins over a built-in name's) and
    the choices."""
    from dataclasses import replace

    from .tuning import candidates as cands
    from .tuning import choose, declared_direction, run_score, selection

    spec = runs[0].tune
    assert spec is not None
    key = selection(spec.metric)[0]
    declared: dict[str, bool] = {}
    for r in tuning:  # the first tuning run that records its task's metrics
        try:
            metrics = (read_run_info(r.run_dir).get("task") or {}).get("metrics") or []
        except (OSError, ValueError, RuntimeError):
            continue
        declared = {m["name"]: bool(m["higher_is_better"]) for m in metrics
                    if isinstance(m, dict) and isinstance(m.get("name"), str) and "higher_is_better" in m}
        if declared:
            break
    if key != "train_loss" and key.removeprefix("val_") in declared:
        spec = replace(spec, higher=declared[key.removeprefix("val_")])
    elif spec.higher is None:  # final:val_<name> the task does not declare: one line naming what it has
        spec = replace(spec, higher=declared_direction(spec.metric, tuning[0].run_dir))
    cells: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for cand, _ in cands(spec):
        for r in tuning:
            if r.run_dir.parent.name == slug(cand):
                cells.setdefault((r.label, r.method), {}).setdefault(cand, {})[r.seed] = run_score(
                    r.run_dir, spec.metric, higher=spec.higher)
    methods_of: dict[str, list[str]] = {}
    for r in runs:
        ms = methods_of.setdefault(r.label, [])
        if r.method not in ms:
            ms.append(r.method)
    return spec, choose(spec, cells, methods_of)


def check_tuning_metric(runs: list[SweepRun], tuning: list[SweepRun]) -> None:
    """Before any tuning run of a task of one's own: the task must declare the selection metric and evaluate a
    validation split (it is built once here to ask it)."""
    from .problem import build_task
    from .tuning import selection

    spec, cfg = runs[0].tune, tuning[0].config
    if spec is None or cfg.task.entry is None:
        return
    key = selection(spec.metric)[0]
    if key == "train_loss":
        return
    task = build_task(cfg)
    names = [m.name for m in task.metrics]
    if key.removeprefix("val_") not in names:
        raise ConfigError(f"sweep.tune.metric {spec.metric!r} reads {key}, but the task ({cfg.task.entry}) declares no "
                          f"metric {key.removeprefix('val_')!r} (its validation columns: "
                          f"{', '.join('val_' + n for n in names)}); choose e.g. final:val_{names[0]}")
    splits = getattr(task, "splits", None)
    if splits is not None and "val" not in splits:
        raise ConfigError(f"sweep.tune.metric {spec.metric!r} is measured on the validation split, which the task "
                          f"({cfg.task.entry}) does not evaluate (its splits: {', '.join(splits) or 'none'}); give it "
                          f"one, or choose metric = \"final_train_loss\"")


def record_tuning(runs: list[SweepRun], spec: TuneSpec, choices: list) -> None:
    """Add ``choices`` to ``OUT/sweep.json`` (``tuning``; the choices of other cells made under the same protocol are
    kept, any others dropped) and write ``OUT/tuning.md`` from the whole record."""
    from .tuning import format_tuning_record, tuning_record

    out = sweep_root(runs)
    record = tuning_record(spec, choices)
    path = out / "sweep.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    old = data.get("tuning")
    if isinstance(old, dict) and isinstance(old.get("choices"), list) and \
            {k: v for k, v in old.items() if k != "choices"} == {k: v for k, v in record.items() if k != "choices"}:
        mine = {(c["setting"], c["method"]) for c in record["choices"]}
        kept = [c for c in old["choices"] if isinstance(c, dict) and isinstance(c.get("setting"), str)
                and (c.get("method") is None or isinstance(c.get("method"), str))
                and (c["setting"], c.get("method")) not in mine]  # a hand-edited entry that is unreadable goes
        record["choices"] = kept + record["choices"]
    data["tuning"] = record
    write_text(path, json.dumps(data, indent=2) + "\n")
    write_text(out / "tuning.md", format_tuning_record(record))


def _visible_device(index: int) -> str:
    """What CUDA_VISIBLE_DEVICES names the ``index``-th GPU this process sees: the entry of the user's own mask (an
    index, a UUID or a MIG name) when one is set, else the index itself."""
    mask = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return mask[index] if index < len(mask) else str(index)


def _free_gpu(slots: list[int], workers: list[_Worker]) -> int:
    """The GPU for a new worker: the one with the most free slots among the live workers' (lowest index first)."""
    busy = collections.Counter(w.gpu for w in workers if w.proc.poll() is None)
    free = collections.Counter(slots)
    free.subtract(busy)
    return max(sorted(free), key=lambda g: free[g])


def _run_all(runs: list[SweepRun], *, jobs: int, progress: bool, desc: str = "sweep",
             slots: list[int] | None = None) -> list[tuple[str, str]]:
    if not runs:  # e.g. every cell's tuning candidates diverged
        return []
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = collections.deque(runs)
    replies: queue.Queue = queue.Queue()
    workers: list[_Worker] = []
    results: list[tuple[str, str]] = []
    failures: list[str] = []
    stop: list[int] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc=desc, unit="run", dynamic_ncols=True)
    say = bar.write if bar is not None else (lambda text: print(text, file=sys.stderr))
    warned: set[str] = set()

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(signum)  # queue nothing more; each busy worker gets the signal once per signal to the sweep
        for w in workers:
            if w.run is not None and w.proc.poll() is None:
                w.proc.send_signal(signum)

    def done(run: SweepRun, outcome: str) -> None:
        if outcome.startswith("stopped") and not (run.run_dir / CHECKPOINT).is_file():
            outcome = "not started (stopped before its first checkpoint; a rerun starts it)"
        results.append((str(run.run_dir), outcome))
        if outcome.startswith("failed"):
            failures.append(f"{run.run_dir}: {outcome[len('failed: '):]}")
            say(f"{run.run_dir}: {outcome}")
        if bar is not None:
            bar.update(1)

    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        plan_dir = sweep_root(runs) / ".plan"  # the configs handed to the workers; this sweep holds the lock
        shutil.rmtree(plan_dir, ignore_errors=True)  # left by a sweep that was killed
        make_run_dir(plan_dir)
        try:
            while True:
                while pending and not stop:
                    idle = next((w for w in workers if w.run is None and w.proc.poll() is None), None)
                    if idle is None and len([w for w in workers if w.proc.poll() is None]) >= jobs:
                        break
                    run = pending.popleft()
                    state = check_existing(run)
                    if state == "finished":
                        done(run, "skipped (finished)")
                        continue
                    if idle is None:  # started on demand: a rerun of a finished sweep starts no process
                        idle = _Worker(threads, replies, _free_gpu(slots, workers) if slots else None)
                        workers.append(idle)
                    idle.start(run, state, Path(plan_dir))
                    if stop:  # a signal arrived while it was starting
                        idle.proc.send_signal(stop[0])
                if not any(w.run is not None for w in workers):
                    break
                try:
                    worker, line = replies.get(timeout=0.2)
                except queue.Empty:
                    continue
                if worker.run is None:
                    continue  # the end of an idle worker's output
                run = worker.run
                outcome, warnings_ = worker.finish(line)
                for text in warnings_:
                    if text not in warned:
                        warned.add(text)
                        say(f"ormo: warning: {text} ({run.run_dir})")
                done(run, outcome)
        finally:
            shutil.rmtree(plan_dir, ignore_errors=True)
    except BaseException:
        for w in workers:  # an unexpected error in the sweep itself: no child may outlive it
            w.proc.kill()
        raise
    finally:
        for w in workers:
            w.close()
        for w in workers:
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.stderr.close()
        for s, handler in old.items():
            signal.signal(s, handler)
        if bar is not None:
            bar.close()
    if stop and (pending or any(o.startswith(("stopped", "not started")) for _, o in results)):
        raise SweepStopped(stop[0], results, len(pending))
    if failures:
        raise SweepFailed(failures, len(runs), results)
    return results
