"""The `tike-trl` command. Each subcommand is a module registered in `COMMANDS` with `run(args) -> int`
and either `add_arguments(parser)` (argparse) or, parsing its own arguments like TRL's scripts,
`make_parser()`: it then gets everything after its name as `args.argv`. Bad input (`InputError`)
is reported on one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import InputError

# subcommand -> module implementing it
COMMANDS = {
    "train": "tike_trl.scripts.grpo",
    "analyze": "tike_trl.analysis.command",
    "recipes": "tike_trl.recipes",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tike-trl", description="TIKE and the k1/k2/k3/rb KL estimators for TRL's GRPO."
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        own_parser = hasattr(module, "make_parser")
        sub = subcommands.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc.split("\n\n")[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=not own_parser,  # its own parser answers --help
        )
        if not own_parser:
            module.add_arguments(sub)
        sub.set_defaults(run=module.run, own_parser=own_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.own_parser:
        args.argv = argv[argv.index(args.command) + 1 :]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args)
    except InputError as err:
        print(f"tike-trl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
