"""The `tike-trl` command. Each subcommand is a module with `add_arguments(parser)` and
`run(args) -> int`, registered in `COMMANDS`; bad input (`InputError`) is reported on one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import InputError

# subcommand -> module implementing it
COMMANDS = {
    "train": "tike_trl.scripts.train",
    "analyze": "tike_trl.analysis.command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tike-trl", description="TIKE and the k1/k2/k3/rb KL estimators for TRL's GRPO."
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        sub = subcommands.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc.split("\n\n")[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InputError as err:
        print(f"tike-trl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
