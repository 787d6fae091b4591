"""Command line.

    ormo train CONFIG [--set section.key=value]... [--run-dir DIR]     one run on the simulator
    ormo train --set task.entry=path/to/task.py:make_task [--set ...]   a task of your own (no CONFIG needed)
    ormo train CONFIG --engine ray [--address HOST:PORT]                the same on real worker processes (Ray)
    ormo train --resume RUN_DIR                                         continue a stopped or killed run
    ormo replay RUN_DIR                                                 rerun a (Ray) run's arrival order exactly
    ormo sweep CONFIG [--methods a,b] [--seeds 0,1,2] [--jobs N] --out DIR
    ormo table RUN_DIRS... [--out DIR]                                  mean ± std tables in the papers' layout
    ormo plot RUN_DIRS... [--out DIR]                                   accuracy / loss vs epochs and vs time
    ormo rules [--import MODULE]                                        every rule and its defaults
    ormo presets                                                        the packaged configs (CONFIG = preset:NAME)
    ormo demo [--out DIR]                                               the quickstart sweep, table and plots
    ormo --version
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ConfigError  # light: torch is imported inside the commands, where a Ctrl-C is handled

if TYPE_CHECKING:
    from .experiment import ExperimentConfig


def _csv(text: str | None, cast=str, *, flag: str = "") -> list | None:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        return [cast(x) for x in items]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _import_overrides(config: str | None, overrides: list[str], modules: list[str] | None) -> list[str]:
    """``--import MODULE`` flags as one ``task.imports`` override: the config's own imports, then these (recorded in
    the run's config, so a resume, a sweep's worker processes and Ray workers import them too)."""
    if not modules:
        return list(overrides)
    from .experiment.config import apply_overrides, read_config_file

    data = apply_overrides(read_config_file(config) if config is not None else {}, overrides)
    task = data.get("task") if isinstance(data.get("task"), dict) else {}
    have = task.get("imports", []) if isinstance(task.get("imports", []), list) else []
    merged = list(dict.fromkeys([*have, *modules]))
    return [*overrides, f"task.imports={json.dumps(merged)}"]


def _cmd_train(args: argparse.Namespace) -> int:
    from .experiment import load_config, to_toml, train

    if args.resume:
        if args.config or args.set or args.imports:
            raise ConfigError("--resume continues a run with its own config: give no CONFIG, --set or --import "
                              "with it (only --address, to continue a Ray run on a cluster at another address)")
        if args.print_config:
            print(to_toml(load_config(args.resume / "config.toml")), end="")
            return 0
        result = train(None, args.resume, resume=True, progress=not args.quiet, address=args.address)
    else:
        if args.config is None and not any(o.split("=", 1)[0].strip() == "task.entry" for o in args.set):
            raise ConfigError("give a CONFIG file (e.g. preset:quickstart or configs/quickstart.toml), a task of "
                              "your own with --set task.entry=path/to/task.py:make_task, or --resume RUN_DIR")
        overrides = _import_overrides(args.config, list(args.set), args.imports)
        if args.address is not None and args.engine != "ray":
            raise ConfigError("--address joins a Ray cluster: use it with --engine ray")
        if args.address is not None:
            overrides.append(f"ray.address={json.dumps(args.address)}")
        cfg = load_config(args.config, overrides)
        if args.print_config:  # the resolved config, exactly as the run directory would record it
            print(to_toml(cfg), end="")
            return 0
        run_dir = args.run_dir or _default_run_dir(cfg)
        print(f"run directory: {run_dir}", file=sys.stderr)
        result = train(cfg, run_dir, progress=not args.quiet, engine=args.engine)
    if result.diverged:  # a result, not a failure: exit 0, but say so on stderr and in the JSON
        print(f"ormo train: {result.diverged}; the run directory records it", file=sys.stderr)
    final = result.final
    primary = _primary_metric(result.run_dir)
    out = {"run_dir": str(result.run_dir), "status": result.status, "epoch": final["epoch"],
           "train_loss": final["train_loss"], f"test_{primary}": final.get(f"test_{primary}"),
           "sim_time_s": final["sim_time_s"], "delay": result.summary.get("delay")}
    val = final.get(f"val_{primary}")
    if val is not None and val == val:  # a run without a validation split: no key (a resumed one reads NaN back)
        out[f"val_{primary}"] = val
    print(json.dumps(_finite_or_null(out), default=str, allow_nan=False))  # valid JSON: NaN/Inf become null
    return 0


def _primary_metric(run_dir: Path) -> str:
    """The run's primary metric (``acc`` for image classification, and for runs made before tasks)."""
    from .experiment.rundir import read_run_info

    try:
        task = read_run_info(run_dir).get("task") or {}
    except (OSError, ValueError, RuntimeError):
        task = {}
    return str((task if isinstance(task, dict) else {}).get("primary") or "acc")


def _finite_or_null(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


def _cmd_replay(args: argparse.Namespace) -> int:
    from .experiment.replay import replay

    out = replay(args.run_dir)
    print(json.dumps(out))
    if not out["bit_identical"]:
        print(f"replay differs from the run: max |Δ| = {out['max_abs_diff']:.3e}", file=sys.stderr)
        return 1
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .experiment.config import apply_overrides, from_dict, read_config_file
    from .experiment.sweep import SweepFailed, SweepStopped, describe_plan, plan_sweep, run_sweep, sweep_root

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"invalid --jobs: {args.jobs} (must be an integer >= 1)")
    per_device = getattr(args, "runs_per_device", None)
    if per_device is not None and per_device < 1:  # before any plan, --dry-run included
        raise ConfigError(f"invalid --runs-per-device: {per_device} (must be an integer >= 1)")
    for flag, text in (("--methods", args.methods), ("--seeds", args.seeds), ("--settings", args.settings)):
        if text is not None and not _csv(text):
            raise ConfigError(f"{flag} {text!r} lists nothing; leave it out to use the config's own list")
        if text is not None and flag != "--settings" and not all(x.strip() for x in text.split(",")):
            raise ConfigError(f"{flag} {text!r} has an empty entry between commas; list each one once, e.g. "
                              f"{flag} {','.join(_csv(text))}")
    if getattr(args, "metrics", None):  # a malformed table metric is found now, not after the last run
        from .report.tables import time_to_target

        for metric in _csv(args.metrics) or []:
            try:
                time_to_target(metric)
            except ValueError as e:
                raise ConfigError(f"--metrics: {e}") from None
    overrides = _import_overrides(args.config, list(args.set), getattr(args, "imports", None))
    runs = plan_sweep(args.config, out=args.out, overrides=overrides, methods=_csv(args.methods),
                      seeds=_csv(args.seeds, int, flag="--seeds"), settings=_settings(args.config, args.settings),
                      grid=args.grid, tune_scope=getattr(args, "tune_scope", None))
    rest = None
    if args.settings is not None or args.methods is not None:  # the folder's table also shows the other cells
        try:
            rest = plan_sweep(args.config, out=args.out, overrides=overrides,
                              seeds=_csv(args.seeds, int, flag="--seeds"), grid=args.grid,
                              tune_scope=getattr(args, "tune_scope", None))
        except ConfigError:  # the config's own list of methods or settings is not plannable: nothing to compare
            rest = None
    if getattr(args, "dry_run", False) or getattr(args, "print_config", False):
        data = read_config_file(args.config)
        data.pop("sweep", None)
        base = from_dict(apply_overrides(data, overrides))
        print(describe_plan(runs, base, full=getattr(args, "print_config", False), rest=rest), end="")
        return 0
    from .experiment.sweep import plan_tuning, sweep_jobs

    tuning = len(plan_tuning(runs))
    jobs, slots = sweep_jobs(runs, args.jobs, per_device, default=2)
    where = ""
    if slots:
        gpus = len(set(slots))
        where = f" on {gpus} GPU{'s' if gpus != 1 else ''}, up to {-(-jobs // gpus)} per GPU"
    print(f"{len(runs)} runs into {args.out}" + (f", after {tuning} tuning runs" if tuning else "")
          + f" ({jobs} at a time{where})", file=sys.stderr)
    failed: SweepFailed | None = None
    try:
        run_sweep(runs, jobs=jobs, progress=not args.quiet, runs_per_device=per_device, rest=rest)
    except SweepFailed as e:  # the finished runs still make a table; the failures are listed after it
        failed = e
    except SweepStopped as e:
        print(f"ormo sweep: {e}", file=sys.stderr)
        return 128 + e.signum  # 130 for Ctrl-C, 143 for SIGTERM
    except KeyboardInterrupt:  # outside the runner's own handling (before it started, or between its phases)
        print("ormo sweep: stopped by SIGINT; finished runs are kept: run the same command again to continue",
              file=sys.stderr)
        return 130
    report_failed = False
    if not args.no_report:
        root = sweep_root(runs)
        from .report.runs import load_runs

        with warnings.catch_warnings():  # the runs that did not finish are listed below (or were listed as they ran)
            warnings.simplefilter("ignore")
            try:
                finished = bool(load_runs([str(root)]))
            except ValueError:
                finished = False
        if finished:
            try:
                _report([str(root)], root, table=True, plot=True, metrics=_csv(args.metrics))
            except (ValueError, FileNotFoundError) as e:  # the runs are kept: only the report failed
                print(f"ormo sweep: error: {e}; the runs are kept: make the table with `ormo table {root}` "
                      f"(and the plots with `ormo plot {root}`)", file=sys.stderr)
                report_failed = True
        else:
            print(f"ormo sweep: no finished run under {root} yet: no table or plots", file=sys.stderr)
    if failed is not None:
        print(f"ormo sweep: error: {failed}", file=sys.stderr)
        return 1
    return 1 if report_failed else 0


def _settings(config: str, text: str | None) -> list[str] | None:
    """--settings: comma-separated labels; a label that itself holds a comma is taken whole."""
    if text is None:
        return None
    from .experiment.config import read_config_file

    try:
        labels = [s.get("label") for s in read_config_file(config).get("sweep", {}).get("settings", [])
                  if isinstance(s, dict)]
    except (ConfigError, AttributeError, TypeError):
        labels = []  # plan_sweep reports what is wrong with the config
    if text in labels:
        return [text]
    if not all(x.strip() for x in text.split(",")):
        raise ConfigError(f"--settings {text!r} has an empty entry between commas; list each one once, e.g. "
                          f"--settings {','.join(_csv(text) or [])!r}")
    return _csv(text)


def _sweep_order(paths: list[str]) -> tuple[list[str] | None, list[str] | None]:
    """The settings and methods order recorded in a sweep folder's sweep.json (None where there is none)."""
    for p in paths:
        order = Path(p) / "sweep.json"
        if order.is_file():
            try:
                data = json.loads(order.read_text(encoding="utf-8"))
                return list(data.get("labels", [])), list(data.get("methods", []))
            except (ValueError, AttributeError, TypeError):
                print(f"ormo: warning: {order} is not readable JSON; settings follow the folders' order",
                      file=sys.stderr)
    return None, None


def _tuned_values(paths: list[str]) -> dict[tuple[str, str], str]:
    """(method, setting) -> the values a tuned sweep chose (``"lr=0.03"``), from the folders' sweep.json."""
    from .experiment.tuning import read_tuning

    out: dict[tuple[str, str], str] = {}
    for p in paths:
        tuning = read_tuning(Path(p))
        choices = (tuning or {}).get("choices")
        if not isinstance(choices, list):
            continue
        _, recorded = _sweep_order([p])
        for c in choices:
            if not isinstance(c, dict) or not isinstance(c.get("setting"), str):
                continue  # a hand-edited file: what is unreadable is skipped
            methods = [c["method"]] if isinstance(c.get("method"), str) else (recorded or [])
            for m in methods:
                out.setdefault((str(m), c["setting"]), str(c.get("chosen") or "none"))
    return out


def _default_out(paths: list[str]) -> Path:
    """Next to the runs: the folder holding all of them (a single run directory's parent)."""
    dirs = [Path(p).resolve() for p in paths]
    dirs = [d.parent if d.is_file() else d for d in dirs]
    common = Path(os.path.commonpath([str(d) for d in dirs]))
    return common.parent if (common / "run.json").is_file() else common


def _report(paths: list[str], out: Path | None, *, table: bool, plot: bool, labels: str | list[str] | None = None,
            metrics: list[str] | None = None, relative_to: str | None = None, metric: str | None = None,
            print_only: bool = False) -> None:
    from .report import load_runs, plot_runs, write_table
    from .report.tables import default_metrics

    records = load_runs(paths)
    if isinstance(labels, str):  # --labels: comma-separated, but a setting label that itself holds a comma is whole
        present = list(dict.fromkeys(r.label for r in records))
        if labels not in present and not all(x.strip() for x in labels.split(",")):
            raise ConfigError(f"--labels {labels!r} has an empty entry between commas; list each one once, e.g. "
                              f"--labels {','.join(_csv(labels) or [])!r}")
        labels = [labels] if labels in present else _csv(labels)
    if labels is None:  # a sweep folder records the order of its settings; runs it does not list come after
        recorded, _ = _sweep_order(paths)
        if recorded is not None:
            present = list(dict.fromkeys(r.label for r in records))
            labels = [x for x in recorded if x in present] + [x for x in present if x not in recorded]
    if table and print_only:  # a filtered view must not replace the sweep's own table.md/table.csv
        from .report.tables import format_table, summarize

        summary = summarize(records, tuple(metrics or default_metrics(records)), labels=labels)
        print(format_table(summary, tuned=_tuned_values(paths), relative_to=relative_to))
        print("(printed only: --labels, --metrics or --relative-to without --out leave the folder's table.md and "
              "table.csv as they are; add --out DIR to write this table there)", file=sys.stderr)
        return
    out = _default_out(paths) if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    if table:
        print(write_table(records, out, labels=labels, metrics=tuple(metrics or default_metrics(records)),
                          tuned=_tuned_values(paths), relative_to=relative_to))
        print(f"(written to {out / 'table.md'} and {out / 'table.csv'})", file=sys.stderr)
    if plot:
        for p in plot_runs(records, out, labels=labels, metric=metric):
            print(f"plot: {p}", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    # the packaged preset, so an installed wheel runs the same demo as the repository, into --out
    ns = argparse.Namespace(config="preset:quickstart", out=args.out, set=[], methods=None, seeds=None,
                            settings=None, grid=None, tune_scope=None, jobs=args.jobs, quiet=False, no_report=False,
                            metrics=None)
    return _cmd_sweep(ns)


def _cmd_rules(args: argparse.Namespace) -> int:
    from .experiment.plugins import import_modules
    from .rules import make_rule, rule_names

    import_modules(args.imports or [], field="--import")
    for name in rule_names():
        print(json.dumps(make_rule(name).describe(), ensure_ascii=False, default=str))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one line for people (no source line, no module path): ``ormo: warning: ...``."""
    print(f"ormo: warning: {message}", file=sys.stderr if file is None else file)


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import preset_description, preset_names

    names = preset_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"preset:{name:<{width}}  {preset_description(name)}")
    return 0


def _default_run_dir(cfg: ExperimentConfig) -> Path:
    """``runs/NAME-METHOD-TIMESTAMP``, the name made a single folder name (no separators, no leading dot), with a
    suffix when a run started in the same second already took it. A long name is cut: a folder name holds at most
    255 bytes."""
    name, method = (re.sub(r"[^A-Za-z0-9._=+-]+", "_", x) for x in (cfg.name, cfg.method.name))
    stem = f"{name[:100]}-{method[:100]}".lstrip(".") or "run"
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 2
    while run_dir.exists():
        run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    return run_dir


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:
        # Run as the program and done (finished, failed or stopped): everything is written and the status is decided.
        # A Ctrl-C while the interpreter exits (torch and Ray teardown take a moment) would otherwise print a
        # traceback from an exit handler and turn the status into -2.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="ormo", description="ordered momentum for asynchronous training",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--version", action="version", version=f"ormo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run one experiment on the simulator (or --resume one)")
    p.add_argument("config", nargs="?",
                   help="a TOML config, e.g. preset:quickstart or configs/quickstart.toml (optional with --set "
                        "task.entry=...)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (TOML syntax), e.g. --set method.lr=0.05; repeatable")
    p.add_argument("--run-dir", type=Path, help="where to write the run (default runs/NAME-METHOD-TIMESTAMP)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped or killed run")
    p.add_argument("--engine", choices=["simulator", "ray"], default="simulator",
                   help="simulator (default) or ray: real worker processes (pip install 'ormo[ray]')")
    p.add_argument("--address", help="with --engine ray: join this Ray cluster (`ray start --head` prints it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (after --set) as TOML and exit without running")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import a module (name or .py path) first, for the models, datasets and rules it registers; "
                        "recorded as task.imports; repeatable")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("replay", help="rerun a recorded run's arrival order in the simulator and compare")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("sweep", help="methods x settings x seeds in parallel processes (resumable)")
    p.add_argument("config", help="a TOML config, usually with a [sweep] section (or preset:NAME)")
    p.add_argument("--out", required=True, help="folder for the runs, the table and the plots")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override, repeatable")
    p.add_argument("--methods", help="comma-separated rule names (default: the config's [sweep] methods)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the config's [sweep] seeds)")
    p.add_argument("--settings", help="comma-separated setting labels to run (default: all)")
    p.add_argument("--grid", action="append", metavar="SECTION.KEY=V1,V2",
                   help="a grid axis: every value in every setting; several flags form a product; repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (each run's folder, state and config difference from the base) and exit")
    p.add_argument("--print-config", action="store_true", help="print every planned run's full config and exit")
    p.add_argument("--tune-scope", choices=("method", "shared", "off"),
                   help="with a [sweep.tune] section: choose per method and setting (method), one value per setting "
                        "for every method (shared), or skip tuning and run the base values (off)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (default 2; for runs on CUDA, one per GPU slot: see --runs-per-device)")
    p.add_argument("--runs-per-device", type=int, default=None, metavar="N",
                   help='runs on CUDA (train.device = "cuda"): spread over every visible GPU, N at a time on each '
                        "(default 1); each run sees only its GPU")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-report", action="store_true", help="do not write the table and plots at the end")
    p.add_argument("--metrics", help="table metrics (default train_loss and the task's primary test metric, e.g. "
                                     "test_acc; also test_loss, val_ppl, delay_max, time_to:val_loss:1.5, ...)")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import a module (name or .py path) first, for what it registers; recorded as task.imports")
    p.set_defaults(func=_cmd_sweep)

    for name, helptext in (("table", "mean ± std tables of finished runs"), ("plot", "PNG curves of runs")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("runs", nargs="+", help="run directories, or folders searched for them")
        p.add_argument("--out", type=Path, help="where to write the files (default: the folder holding the runs)")
        p.add_argument("--labels", help="comma-separated settings to show, in this order (default: all)")
        if name == "table":
            p.add_argument("--metrics", help="default train_loss and the task's primary test metric (test_acc for "
                                             "image classification); also test_loss, val_acc, val_loss, any "
                                             "test_/val_ column of the task (val_ppl, ...), delay_mean, delay_max, "
                                             "sim_time_s, time_to_acc:85 (simulated seconds to 85 %% test "
                                             "accuracy), time_to_val_acc:85, time_to:val_loss:1.5 (any column, on "
                                             "its better side)")
            p.add_argument("--relative-to", metavar="METHOD",
                           help="with a time_to_acc metric: how many times sooner each method gets there than METHOD")
        else:
            p.add_argument("--metric", metavar="COLUMN",
                           help="the left panels' metric (default: the task's primary one on the test split, e.g. "
                                "test_acc; val_ppl, ...)")
        p.set_defaults(func=lambda a, n=name: _report(a.runs, a.out, table=n == "table", plot=n == "plot",
                                                      labels=a.labels, metrics=_csv(getattr(a, "metrics", None)),
                                                      relative_to=getattr(a, "relative_to", None),
                                                      metric=getattr(a, "metric", None),
                                                      print_only=n == "table" and a.out is None and bool(
                                                          a.labels or getattr(a, "metrics", None)
                                                          or getattr(a, "relative_to", None))) or 0)

    p = sub.add_parser("rules", help="list every rule with its scheduler, messages and default hyperparameters")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import a module (name or .py path) first: the rules it registers are listed too")
    p.set_defaults(func=_cmd_rules)

    p = sub.add_parser("presets", help="list the packaged configs, usable as CONFIG = preset:NAME")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("demo", help="the quickstart: a sweep on the bundled digits, its table and plots")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--jobs", type=int, default=2)
    p.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except ConfigError as e:  # bad input: the message names the field and the constraint
        print(f"ormo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # RunStopped carries its signal: 130 for SIGINT, 143 for SIGTERM
        if hasattr(e, "exit_code"):
            print(f"ormo {args.command}: {e}", file=sys.stderr)
            return int(e.exit_code)
        hint = {"train": "; if its run directory was made, `ormo train --resume DIR` continues it",
                "sweep": "; run the same command again to continue", "demo": "; run it again to continue"}
        print(f"ormo {args.command}: interrupted{hint.get(args.command, '')}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ormo rules | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        from .experiment.rundir import RunDirError, explain_os_error

        if isinstance(e, RunDirError):  # a run directory or file that cannot be used: names the file and the fix
            print(f"ormo {args.command}: error: {e}", file=sys.stderr)
        elif isinstance(e, FileNotFoundError | ValueError) and args.command in ("table", "plot"):
            print(f"ormo {args.command}: error: {e}", file=sys.stderr)  # the reports' messages name file and fix
        elif isinstance(e, FileNotFoundError | ValueError | RuntimeError):
            print(f"ormo {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        elif isinstance(e, OSError):  # a file-system failure outside the run-directory writers: still one line
            print(f"ormo {args.command}: error: {explain_os_error(e)}", file=sys.stderr)
        else:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
