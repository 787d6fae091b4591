"""Command line: ``ormo demo`` (a small simulated comparison) and ``ormo rules`` (the registry)."""

from __future__ import annotations

import argparse
import json
import sys

from .rules import make_rule, rule_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ormo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the small simulated comparison and print the table")
    sub.add_parser("rules", help="list every rule with its scheduler, messages and default hyperparameters")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main()
    elif args.command == "rules":
        for name in rule_names():
            print(json.dumps(make_rule(name).describe(), ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
