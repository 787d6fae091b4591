"""Command line.

    ormo train CONFIG [--set section.key=value]... [--run-dir DIR]     one run on the simulator
    ormo train CONFIG --engine ray [--address HOST:PORT]                the same on real worker processes (Ray)
    ormo train --resume RUN_DIR                                         continue a stopped or killed run
    ormo replay RUN_DIR                                                 rerun a (Ray) run's arrival order exactly
    ormo sweep CONFIG [--methods a,b] [--seeds 0,1,2] [--jobs N] --out DIR
    ormo table RUN_DIRS... [--out DIR]                                  mean ± std tables in the papers' layout
    ormo plot RUN_DIRS... [--out DIR]                                   accuracy / loss vs epochs and vs time
    ormo rules                                                          every rule and its defaults
    ormo demo                                                           the quickstart sweep, table and plots
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .rules import make_rule, rule_names
from .rules.base import ConfigError


def _csv(text: str | None, cast=str) -> list | None:
    return None if text is None else [cast(x.strip()) for x in text.split(",") if x.strip()]


def _cmd_train(args: argparse.Namespace) -> int:
    from .experiment import load_config, to_toml, train

    if args.resume:
        if args.config or args.set:
            raise ConfigError("--resume continues a run with its own config: give no CONFIG or --set with it")
        if args.print_config:
            print(to_toml(load_config(args.resume / "config.toml")), end="")
            return 0
        result = train(None, args.resume, resume=True, progress=not args.quiet)
    else:
        if args.config is None:
            raise ConfigError("give a CONFIG file (e.g. configs/quickstart.toml) or --resume RUN_DIR")
        overrides = list(args.set)
        if args.address and args.engine != "ray":
            raise ConfigError("--address joins a Ray cluster: use it with --engine ray")
        if args.address:
            overrides.append(f'ray.address="{args.address}"')
        cfg = load_config(args.config, overrides)
        if args.print_config:  # the resolved config, exactly as the run directory would record it
            print(to_toml(cfg), end="")
            return 0
        run_dir = args.run_dir or Path("runs") / f"{cfg.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"run directory: {run_dir}", file=sys.stderr)
        result = train(cfg, run_dir, progress=not args.quiet, engine=args.engine)
    if result.diverged:  # a result, not a failure: exit 0, but say so on stderr and in the JSON
        print(f"ormo train: {result.diverged}; the run directory records it", file=sys.stderr)
    final = result.final
    out = {"run_dir": str(result.run_dir), "status": result.status, "epoch": final["epoch"],
           "train_loss": final["train_loss"], "test_acc": final["test_acc"], "sim_time_s": final["sim_time_s"],
           "delay": result.summary.get("delay")}
    print(json.dumps(_finite_or_null(out), default=str, allow_nan=False))  # valid JSON: NaN/Inf become null
    return 0


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
    from .experiment.sweep import plan_sweep, run_sweep

    runs = plan_sweep(args.config, out=args.out, overrides=args.set, methods=_csv(args.methods),
                      seeds=_csv(args.seeds, int), settings=_csv(args.settings), grid=args.grid)
    print(f"{len(runs)} runs into {args.out} ({args.jobs} at a time)", file=sys.stderr)
    run_sweep(runs, jobs=args.jobs, progress=not args.quiet)
    if not args.no_report:
        labels = list(dict.fromkeys(r.label for r in runs))  # the config's order of settings
        _report([args.out], Path(args.out), table=True, plot=True, labels=labels, metrics=_csv(args.metrics))
    return 0


def _report(paths: list[str], out: Path, *, table: bool, plot: bool, labels: list[str] | None = None,
            metrics: list[str] | None = None) -> None:
    from .report import load_runs, plot_runs, write_table

    records = load_runs(paths)
    if labels is None:  # a sweep folder records the order of its settings
        for p in paths:
            order = Path(p) / "sweep.json"
            if order.is_file():
                labels = json.loads(order.read_text())["labels"]
                present = {r.label for r in records}
                labels = [x for x in labels if x in present] or None
                break
    out.mkdir(parents=True, exist_ok=True)
    if table:
        print(write_table(records, out, labels=labels, metrics=tuple(metrics or ("train_loss", "test_acc"))))
        print(f"(written to {out / 'table.md'} and {out / 'table.csv'})", file=sys.stderr)
    if plot:
        for p in plot_runs(records, out, labels=labels):
            print(f"plot: {p}", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    config = Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml"
    if not config.is_file():  # installed without the repository's configs/: the small built-in comparison
        from .demo import main as demo_main

        demo_main()
        return 0
    ns = argparse.Namespace(config=str(config), out=args.out, set=[], methods=None, seeds=None, settings=None,
                            grid=None, jobs=args.jobs, quiet=False, no_report=False, metrics=None)
    return _cmd_sweep(ns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ormo", description="ordered momentum for asynchronous training",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run one experiment on the simulator (or --resume one)")
    p.add_argument("config", nargs="?", help="a TOML config, e.g. configs/quickstart.toml")
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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("replay", help="rerun a recorded run's arrival order in the simulator and compare")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("sweep", help="methods x settings x seeds in parallel processes (resumable)")
    p.add_argument("config", nargs="?", help="a TOML config, usually with a [sweep] section")
    p.add_argument("--out", required=True, help="folder for the runs, the table and the plots")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override, repeatable")
    p.add_argument("--methods", help="comma-separated rule names (default: the config's [sweep] methods)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the config's [sweep] seeds)")
    p.add_argument("--settings", help="comma-separated setting labels to run (default: all)")
    p.add_argument("--grid", action="append", metavar="SECTION.KEY=V1,V2",
                   help="ad-hoc settings, one per value (replaces the config's settings); repeatable")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-report", action="store_true", help="do not write the table and plots at the end")
    p.add_argument("--metrics", help="table metrics (default train_loss,test_acc; also test_loss, delay_max, ...)")
    p.set_defaults(func=_cmd_sweep)

    for name, helptext in (("table", "mean ± std tables of finished runs"), ("plot", "PNG curves of runs")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("runs", nargs="+", help="run directories, or folders searched for them")
        p.add_argument("--out", type=Path, default=Path("."), help="where to write the files (default .)")
        p.add_argument("--labels", help="comma-separated settings to show, in this order (default: all)")
        if name == "table":
            p.add_argument("--metrics", help="default train_loss,test_acc; also test_loss, delay_mean, delay_max")
        p.set_defaults(func=lambda a, n=name: _report(a.runs, a.out, table=n == "table", plot=n == "plot",
                                                      labels=_csv(a.labels), metrics=_csv(getattr(a, "metrics", None)))
                       or 0)

    p = sub.add_parser("rules", help="list every rule with its scheduler, messages and default hyperparameters")
    p.set_defaults(func=lambda a: [print(json.dumps(make_rule(n).describe(), ensure_ascii=False, default=str))
                                   for n in rule_names()] and 0)

    p = sub.add_parser("demo", help="the quickstart: a sweep on the bundled digits, its table and plots")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--jobs", type=int, default=2)
    p.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    from .experiment.rundir import RunDirError, explain_os_error
    from .experiment.runloop import RunStopped

    try:
        return args.func(args)
    except ConfigError as e:  # bad input: the message names the field and the constraint
        print(f"ormo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunDirError as e:  # a run directory or file that cannot be used: the message names the file and the fix
        print(f"ormo {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"ormo {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file-system failure outside the run-directory writers: still one line
        print(f"ormo {args.command}: error: {explain_os_error(e)}", file=sys.stderr)
        return 1
    except RunStopped as e:  # SIGINT 130, SIGTERM 143: the shell's codes for death by that signal
        print(f"ormo {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"ormo {args.command}: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
