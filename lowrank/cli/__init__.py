"""The `lowrank` command.

Every module in this package (other than those starting with "_") defines
`register(subparsers)`, adding its sub-commands; handlers are set with
`parser.set_defaults(handler=fn)` and receive the parsed `argparse.Namespace`.
Modules import heavy dependencies (torch) inside their handlers, so that
`lowrank api` never imports torch.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

from lowrank.cli._common import CliError, OneLineParser


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="lowrank", description="lowrank-lab: low-rank network experiments.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.handler(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Invalid LOWRANK_* settings (jobs.settings.Settings). pydantic is imported by whoever raised it;
        # importing it up front would cost every `lowrank` command ~40 ms.
        pydantic = sys.modules.get("pydantic")
        if pydantic is None or not isinstance(exc, pydantic.ValidationError) or exc.title != "Settings":
            raise
        from jobs.settings import describe_settings_error

        print(f"error: {describe_settings_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
