"""What every `lowrank` sub-command shares: one-line usage errors (exit code 2) and --help that shows
each option's default."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn


class CliError(Exception):
    """A mistake the user made; `lowrank` prints it on one line and exits with code 2."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help line ends with its default, e.g. "(default: 2.0)", also for options without
    help text. Left out: flags (store_true/false), defaults of None (the server or spec decides, which
    the help says), and help that already names its default (e.g. one read from the environment, so
    --help never prints a token)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and action.help is None and self._default_text(action):
            action.help = self._default_text(action)  # argparse prints no help column without help text
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        extra = self._default_text(action) if "default" not in text else ""
        return f"{text} {extra}".strip() if extra else text

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        """'(default: X)', or '' for positionals, flags and defaults of None or an empty list."""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS or default == []
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                       argparse._HelpAction, argparse._VersionAction))):
            return ""
        text = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"(default: {text.replace('%', '%%')})"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2; --help shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def parse_int_list(text: str, field: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{field} must be a comma-separated list of integers, got {text!r}") from None


def parse_str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def flags_to_config(args: Any, flags: list[tuple[str, str, Any, str]], config: dict[str, Any]) -> dict[str, Any]:
    """Put every flag given on the command line into `config` (updated and returned).

    flags: `(flag, config key, int | float | str | "list", help)`; "list" is comma-separated strings.
    A value of the wrong type is a CliError naming the flag.
    """
    for flag, key, kind, _ in flags:
        raw = getattr(args, key)
        if raw is None:
            continue
        if kind == "list":
            config[key] = parse_str_list(raw)
            continue
        try:
            config[key] = kind(raw)
        except ValueError:
            raise CliError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    return config


def check_model_and_rank(args: Any, models: Any) -> None:
    """--model among `models`, --rank >= 1 and --rank-ratio in (0, 1] when given (factorize, latency)."""
    if args.model not in models:
        raise CliError(f"--model must be one of {', '.join(models)}, got {args.model!r}")
    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be an integer >= 1, got {args.rank}")
    if args.rank_ratio is not None and not 0 < args.rank_ratio <= 1:
        raise CliError(f"--rank-ratio must be in (0, 1], got {args.rank_ratio}")
