"""A sweep's tuning protocol: choose values (e.g. ``method.lr``) on the validation split before the real seeds run.

A config's ``[sweep.tune]`` section::

    [sweep.tune]
    grid = {"method.lr" = [0.01, 0.03, 0.1]}   # candidates: every point of the product of the axes
    seeds = [1000]                             # tuning seeds (default [1000]); the score is their mean
    metric = "final_val_acc"                   # or best_val_acc, final_val_loss, final_train_loss; for any metric
                                               # of the task: final:val_<name> or best:val_<name> (e.g.
                                               # "final:val_ppl"), in the direction the task declares
    scope = "method"                           # per method and setting; "shared": one value per setting for all
    reference = "asgd"                         # with scope = "shared": choose on this method alone
    budget = 0.5                               # tuning runs train this fraction of the epochs (default 1), the
                                               # schedule's epochs (warm-up, milestones) scaled alike
    set = {"data.augment" = false}             # other overrides for the tuning runs only, applied last

Each (setting, method) cell runs every candidate with every tuning seed, ``train.eval_test = false`` (the test split
is dropped right after loading and no row holds a test metric), into ``OUT/.tuning/<setting>/<method>/<candidate>/
seed<k>``: ordinary run directories, resumable like any sweep run. Then the best candidate (its score is the mean
over the tuning seeds; a seed that diverged makes the candidate's score NaN, which never wins; ties go to the
candidate listed first) is applied to that cell's real runs. With ``scope = "shared"`` one candidate is chosen per
setting for every method: the best mean score over the methods (NaN if any method diverged), or the reference
method's score alone. ``scope = "off"`` (``--tune-scope off``) skips tuning: the base values run as they are.

The choices, every candidate's score and the rule go into ``OUT/sweep.json`` (key ``tuning``) and ``OUT/tuning.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..rules.base import ConfigError
from .config import override_key, same_value_key

#: selection metric -> (metrics row key, how a run's rows reduce to one number, True if higher is better)
SELECTION_METRICS: dict[str, tuple[str, str, bool]] = {
    "final_val_acc": ("val_acc", "last", True),
    "best_val_acc": ("val_acc", "best", True),
    "final_val_loss": ("val_loss", "last", False),
    "final_train_loss": ("train_loss", "last", False),
}
#: ``final:<column>`` / ``best:<column>``: any validation column of the task (or train_loss), its direction declared
#: by the task (run.json), e.g. ``final:val_ppl``
REDUCTIONS = {"final": "last", "best": "best"}


def selection(metric: Any) -> tuple[str, str, bool | None]:
    """(row key, reduction, higher is better) of a selection metric; the direction is None when the task declares it
    (read from the tuning runs). Never a test column: selection never reads the test split."""
    if isinstance(metric, str) and metric in SELECTION_METRICS:
        return SELECTION_METRICS[metric]
    reduce, sep, key = metric.partition(":") if isinstance(metric, str) else ("", "", "")
    if sep and reduce in REDUCTIONS and (key == "train_loss" or (key.startswith("val_") and len(key) > 4)):
        known = {k: h for k, _, h in SELECTION_METRICS.values()}
        return key, REDUCTIONS[reduce], known.get(key)
    raise ConfigError(f"invalid sweep.tune.metric {metric!r}; choose one of {', '.join(SELECTION_METRICS)}, or "
                      f"final:val_<metric> / best:val_<metric> for a metric of your task (e.g. final:val_ppl); "
                      f"selection never reads the test split")


def declared_direction(metric: str, run_dir: Path) -> bool:
    """Whether a larger value of ``metric``'s column is better, as the task of the run in ``run_dir`` declares it."""
    from .rundir import read_run_info

    key, _, known = selection(metric)
    if known is not None:
        return known
    name = key.removeprefix("val_")
    declared = (read_run_info(run_dir).get("task") or {}).get("metrics") or []
    for m in declared:
        if isinstance(m, dict) and m.get("name") == name:
            return bool(m["higher_is_better"])
    names = ", ".join(f"val_{m.get('name')}" for m in declared if isinstance(m, dict))
    raise ConfigError(f"sweep.tune.metric {metric!r}: the task of {run_dir} declares no metric {name!r} (its "
                      f"validation columns: {names or 'none'}); choose one of those")
SCOPES = ("method", "shared", "off")
DEFAULT_TUNING_SEEDS = (1000,)
TUNING_DIR = ".tuning"


@dataclass(frozen=True)
class TuneSpec:
    """A parsed ``[sweep.tune]`` section (see the module docstring)."""

    #: key -> candidate values as TOML texts, in the order given
    axes: tuple[tuple[str, tuple[str, ...]], ...]
    seeds: tuple[int, ...]
    metric: str
    scope: str
    reference: str | None
    #: overrides for the tuning runs only
    extra: tuple[str, ...]
    #: the fraction of the real runs' epochs a tuning run trains (schedule epochs scaled alike)
    budget: float = 1.0
    #: whether a higher score is better (None until the task's declaration is read, for ``final:val_<name>``)
    higher: bool | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.axes)

    @property
    def higher_is_better(self) -> bool | None:
        """``higher``, or the direction of a built-in selection metric; None while a task's is unknown."""
        return self.higher if self.higher is not None else selection(self.metric)[2]

    def describe(self) -> dict[str, Any]:
        higher = self.higher_is_better
        better = "as the task declares" if higher is None else "higher" if higher else "lower"
        return {"metric": self.metric, "better": better, "scope": self.scope,
                "reference": self.reference, "seeds": list(self.seeds), "grid": {k: list(v) for k, v in self.axes},
                "budget": self.budget, "tuning_set": list(self.extra),
                "rule": ("mean over the tuning seeds; a diverged seed makes the score NaN (never chosen); ties go to "
                         "the candidate listed first" + ("; shared: one value per setting, chosen on "
                                                         + (f"{self.reference!r} alone" if self.reference else
                                                            "the mean score over the methods")
                                                         if self.scope == "shared" else ""))}


def parse_tune(raw: Any, *, scope: str | None, as_override, parse_value) -> TuneSpec | None:
    """``[sweep.tune]`` as a :class:`TuneSpec` (None without one, or with scope ``off``). ``scope`` (the command
    line's ``--tune-scope``) replaces the section's own."""
    if scope is not None and scope not in SCOPES:
        raise ConfigError(f"invalid --tune-scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if raw is None:
        if scope not in (None, "off"):
            raise ConfigError(f"--tune-scope {scope} needs a [sweep.tune] section with a grid of candidates, e.g. "
                              f"grid = {{\"method.lr\" = [0.01, 0.03]}}")
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep.tune must be a table with a grid of candidates, got {raw!r}")
    unknown = sorted(set(raw) - {"grid", "seeds", "metric", "scope", "reference", "budget", "set"})
    if unknown:
        raise ConfigError(f"unknown key sweep.tune.{unknown[0]}; [sweep.tune] accepts: grid, seeds, metric, scope, "
                          f"reference, budget, set (candidate values go in grid = {{\"method.lr\" = [...]}})")
    budget = raw.get("budget", 1.0)
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ConfigError(f"invalid sweep.tune.budget {budget!r}: the fraction of the real runs' epochs a tuning run "
                          f"trains, a number in (0, 1] (e.g. 0.5)")
    scope = scope if scope is not None else raw.get("scope", "method")
    if scope not in SCOPES:
        raise ConfigError(f"invalid sweep.tune.scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if scope == "off":
        return None
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"sweep.tune.grid must be a non-empty table of candidates like {{\"method.lr\" = [0.01, "
                          f"0.03]}}, got {grid!r}")
    axes = []
    for key, values in grid.items():
        key = override_key(key) if isinstance(key, str) else key  # "method . lr " is method.lr (as --set reads it)
        if key in [k for k, _ in axes]:  # "method.lr" and "method . lr": one key spelled twice
            raise ConfigError(f"sweep.tune.grid sets {key} twice (spelled differently); list its candidates once")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.tune.grid.{key}: expected a non-empty list of candidate values, got {values!r}")
        texts = tuple(as_override(f"sweep.tune.grid.{key}", key, v).split("=", 1)[1] for v in values)
        if len({same_value_key(parse_value(t)) for t in texts}) != len(texts):  # 1 and 1.0, [1] and [1.0]
            raise ConfigError(f"sweep.tune.grid.{key} lists a value twice: {', '.join(texts)}")
        axes.append((key, texts))
    seeds = raw.get("seeds", list(DEFAULT_TUNING_SEEDS))
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ConfigError(f"sweep.tune.seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep.tune.seeds lists a seed twice: {seeds}")
    metric = raw.get("metric", "final_val_acc")
    higher = selection(metric)[2]
    reference = raw.get("reference")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ConfigError(f"sweep.tune.reference must be a method label, got {reference!r}")
    if reference is not None and scope != "shared":
        raise ConfigError(f"sweep.tune.reference = {reference!r} chooses one value for every method, which is "
                          f"scope = \"shared\" (the scope is {scope!r}); set scope = \"shared\" or drop reference")
    extra = raw.get("set") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"sweep.tune.set must be a table of overrides like {{\"train.epochs\" = 5}}, got {extra!r}")
    extra_over = tuple(as_override("sweep.tune.set", override_key(k) if isinstance(k, str) else k, v)
                       for k, v in extra.items())
    tuned = {k for k, _ in axes}
    for item in extra_over:
        key = override_key(item)
        if key in tuned:
            raise ConfigError(f"sweep.tune.set sets {key}, which sweep.tune.grid tunes; drop one of them")
        if key in ("train.eval_test", "train.seed", "train.label", "method.name", "method.label"):
            raise ConfigError(f"sweep.tune.set sets {key}, which the tuning runs set themselves")
    return TuneSpec(axes=tuple(axes), seeds=tuple(seeds), metric=metric, scope=scope, reference=reference,
                    extra=extra_over, budget=float(budget), higher=higher)


def budget_overrides(cfg: Any, budget: float) -> tuple[str, ...]:
    """Overrides that shorten ``cfg`` (a resolved config) to ``budget`` of its epochs, its schedule scaled alike."""
    if budget == 1.0:
        return ()
    over = [f"train.epochs={cfg.train.epochs * budget!r}"]
    if cfg.schedule.milestones:
        over.append(f"schedule.milestones=[{', '.join(repr(m * budget) for m in cfg.schedule.milestones)}]")
    if cfg.schedule.warmup_epochs:
        over.append(f"schedule.warmup_epochs={cfg.schedule.warmup_epochs * budget!r}")
    return tuple(over)


def candidates(spec: TuneSpec) -> list[tuple[str, tuple[str, ...]]]:
    """(label, overrides) of every candidate: the product of the axes, in the order given (``lr=0.01``)."""
    short = {key: key.split(".")[-1] for key in spec.keys}
    names = {key: short[key] if list(short.values()).count(short[key]) == 1 else key for key in spec.keys}
    points: list[tuple[str, tuple[str, ...]]] = [("", ())]
    for key, texts in spec.axes:
        points = [(f"{label} {names[key]}={text}".strip(), (*over, f"{key}={text}"))
                  for label, over in points for text in texts]
    return points


def run_score(run_dir: Path, metric: str, *, higher: bool | None = None) -> float:
    """One tuning run's score: NaN when it diverged or has no value for the metric."""
    from .metrics import read_metrics
    from .rundir import read_run_info

    try:
        info = read_run_info(run_dir)
        rows = read_metrics(run_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"tuning run {run_dir} cannot be scored: its run.json or metrics.jsonl is missing or "
                          f"damaged ({type(e).__name__}: {e}); delete that directory and rerun the sweep to redo it"
                          ) from None
    final = info.get("final")
    if isinstance(final, dict) and isinstance(final.get("iteration"), int) and (
            not rows or rows[-1].get("iteration") != final["iteration"]):  # cut short: an earlier epoch's score
        raise ConfigError(f"tuning run {run_dir} cannot be scored: the last row of metrics.jsonl has iteration = "
                          f"{rows[-1].get('iteration') if rows else None!r} but run.json's final row says "
                          f"{final['iteration']!r} (metrics.jsonl is cut short or damaged); delete that directory and "
                          f"rerun the sweep to redo it")
    if info.get("diverged"):
        return math.nan
    key, reduce, known = selection(metric)
    higher = higher if higher is not None else known
    if higher is None and reduce == "best":
        higher = declared_direction(metric, run_dir)
    values = [float(r[key]) for r in rows if isinstance(r, dict) and r.get(key) is not None]
    values = [v for v in values if math.isfinite(v)] if reduce == "best" else values
    if not values:
        return math.nan
    if reduce == "last":
        return values[-1]
    return max(values) if higher else min(values)


def mean_score(scores: list[float]) -> float:
    return math.nan if not scores or any(not math.isfinite(s) for s in scores) else sum(scores) / len(scores)


def best_index(scores: list[float], *, higher: bool) -> int | None:
    """The index of the best finite score (the first one among equals); None if none is finite."""
    best = None
    for i, s in enumerate(scores):
        if math.isfinite(s) and (best is None or (s > scores[best] if higher else s < scores[best])):
            best = i
    return best


@dataclass(frozen=True)
class Choice:
    """The outcome of tuning one cell (scope method) or one setting (scope shared: ``method`` is None)."""

    setting: str
    method: str | None
    #: (candidate label, overrides, score per method -> per-seed scores) in the candidates' order
    scores: tuple[tuple[str, tuple[str, ...], float, dict[str, list[float]]], ...]
    chosen: int | None

    @property
    def overrides(self) -> tuple[str, ...]:
        return () if self.chosen is None else self.scores[self.chosen][1]

    @property
    def label(self) -> str | None:
        return None if self.chosen is None else self.scores[self.chosen][0]


def choose(spec: TuneSpec, cells: dict[tuple[str, str], dict[str, dict[int, float]]],
           methods_of: dict[str, list[str]]) -> list[Choice]:
    """The choices from ``cells[(setting, method)][candidate label][seed] = score``; ``methods_of[setting]`` lists
    the methods that run in that setting."""
    points = candidates(spec)
    higher = spec.higher_is_better
    if higher is None:
        raise ValueError(f"the direction of sweep.tune.metric {spec.metric!r} is not known yet (read it from the "
                         f"tuning runs with declared_direction)")
    out = []
    groups: list[tuple[str, str | None, list[str]]]
    if spec.scope == "shared":
        groups = [(s, None, [spec.reference] if spec.reference else ms) for s, ms in methods_of.items()]
    else:
        groups = [(s, m, [m]) for s, ms in methods_of.items() for m in ms]
    for setting, method, judged in groups:
        rows = []
        for label, over in points:
            per_method = {m: [cells[(setting, m)][label][seed] for seed in spec.seeds] for m in judged}
            means = [mean_score(v) for v in per_method.values()]
            rows.append((label, over, mean_score(means), per_method))
        out.append(Choice(setting, method, tuple(rows), best_index([r[2] for r in rows], higher=higher)))
    return out


def choice_for(choices: list[Choice], setting: str, method: str) -> Choice:
    for c in choices:
        if c.setting == setting and c.method in (None, method):
            return c
    raise KeyError((setting, method))


def tuning_record(spec: TuneSpec, choices: list[Choice]) -> dict[str, Any]:
    """What ``sweep.json`` keeps under ``tuning``."""
    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {**spec.describe(), "choices": [
        {"setting": c.setting, "method": c.method, "chosen": c.label,
         "values": dict(o.split("=", 1) for o in c.overrides),
         "candidates": [{"candidate": label, "score": num(score),
                         "seeds": {m: [num(v) for v in vs] for m, vs in per.items()}}
                        for label, _, score, per in c.scores]} for c in choices]}


def _md(text: str) -> str:
    """Text for one Markdown table cell (a ``|`` in a label would end the cell, a line break the row)."""
    return " ".join(text.splitlines()).replace("|", "\\|")


def format_tuning_record(record: dict[str, Any]) -> str:
    """``tuning.md`` from a ``sweep.json`` tuning record: per setting, one row per method (or one shared row), one
    column per candidate, the chosen candidate in bold."""
    choices = [c for c in record.get("choices", []) if isinstance(c, dict) and isinstance(c.get("setting"), str)]
    points = list(dict.fromkeys(str(x.get("candidate")) for c in choices for x in c.get("candidates", [])
                                if isinstance(x, dict)))
    seeds = ", ".join(map(str, record.get("seeds", [])))
    lines = [f"# Tuning: {record.get('metric')} ({record.get('better')} is better) on the validation split, mean over "
             f"tuning seeds {seeds}; scope {record.get('scope')}"
             + (f", reference {record['reference']}" if record.get("reference") else ""), "",
             f"Rule: {record.get('rule')}.", ""]
    if record.get("budget", 1.0) != 1.0:
        lines += [f"Tuning runs train {record['budget']:g} of the real runs' epochs (schedule scaled alike).", ""]
    if record.get("tuning_set"):
        lines += [f"Tuning runs also set: {', '.join(map(str, record['tuning_set']))}.", ""]
    lines += ["A score is missing (—) where a tuning seed diverged or the run has no value for the metric.", ""]
    for setting in dict.fromkeys(c["setting"] for c in choices):
        lines += [f"## {' '.join(setting.splitlines())}", "", "| method | " + " | ".join(map(_md, points))
                  + " | chosen |", "|:---|" + "---:|" * len(points) + ":---|"]
        for c in (c for c in choices if c["setting"] == setting):
            by_label = {str(x.get("candidate")): x.get("score") for x in c.get("candidates", []) if isinstance(x, dict)}
            cells = []
            for label in points:
                score = by_label.get(label)
                text = f"{score:.4g}" if isinstance(score, int | float) and math.isfinite(score) else "—"
                cells.append(f"**{text}**" if label == c.get("chosen") else text)
            name = c.get("method") or ("all (" + (record.get("reference") or "mean over methods") + ")")
            chosen = c.get("chosen") or "none (no candidate has a score)"
            lines.append(f"| {_md(str(name))} | " + " | ".join(cells) + f" | {_md(str(chosen))} |")
        lines.append("")
    return "\n".join(lines)


def read_tuning(out: Path) -> dict[str, Any] | None:
    """The ``tuning`` record of a sweep folder's ``sweep.json`` (None without one or when unreadable)."""
    try:
        data = json.loads((Path(out) / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tuning = data.get("tuning") if isinstance(data, dict) else None
    return tuning if isinstance(tuning, dict) else None
