"""The `tike-trl` command: one subcommand per module, each exposing `add_arguments(parser)` and
`run(args)`; register new ones in SUBCOMMANDS."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# subcommand -> module implementing it
SUBCOMMANDS = {
    "analyze": "tike_trl.analyze",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tike-trl", description="TIKE and the k1/k2/k3/rb KL estimators for TRL's GRPO.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        summary = module.__doc__.strip().splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=module.__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
