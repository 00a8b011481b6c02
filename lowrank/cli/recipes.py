"""`lowrank recipes`: the named training recipes and their values (core/recipes.py).

    lowrank recipes [--json]

A train run (`lowrank train`, `lowrank submit train`, a job spec) takes its recipe's value for every
field it leaves out; `--recipe NAME` picks another recipe than the data set's.
"""
from __future__ import annotations

import argparse

from lowrank.cli._common import print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("recipes", help="list the training recipes and their values",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print them as a JSON list")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from core.recipes import RECIPES, describe

    rows = [row for name in RECIPES for row in describe(name)]
    if args.json:
        print_json(rows)
        return 0
    keys = list(dict.fromkeys(k for r in rows for k in r["values"]))
    head = ["recipe", "models", "default for", *keys]
    table = [head] + [[r["recipe"], r["models"], ",".join(r["datasets"]), *(str(r["values"].get(k, "-")) for k in keys)]
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("(image_size -: the data set's size; small_input: on for images <= 64 px unless set)")
    print()
    for name, recipe in RECIPES.items():
        print(f"{name}: {recipe.summary}. Source: {recipe.source}.")
    return 0
