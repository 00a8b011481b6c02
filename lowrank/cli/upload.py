"""`lowrank upload FILE`: store a weights file on the API and print its id and its tensors.

    lowrank upload r18.safetensors            # id, then one line per tensor: name, shape, dtype
    lowrank upload w.npy --json               # the API's answer

The id is an approx/learn weights source (`lowrank submit approx --upload ID`) or a compress job's
(`lowrank submit compress --upload ID --model resnet18`). Formats: .npy, .npz, .safetensors and
weights-only .pt (a state_dict's tensors are listed by their keys).
"""
from __future__ import annotations

import argparse

from lowrank.cli._client import client, conn_args, run
from lowrank.cli._common import print_json


def cmd_upload(args: argparse.Namespace) -> int:
    with client(args) as c:
        up = c.upload(args.file)
    if args.json:
        print_json(up)
        return 0
    arrays = up.get("arrays") or {}
    print(up["id"])
    print(f"  {up['filename']}: {up['format']}, {up['size']:,} bytes, {len(arrays)} tensor(s)"
          + ("" if arrays else " (a .pt of one tensor: no names)"))
    width = max((len(name) for name in arrays), default=0)
    for name, info in sorted(arrays.items()):  # the database keeps no order
        print(f"  {name:<{width}}  {'x'.join(map(str, info['shape'])) or 'scalar'}  {info['dtype']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("upload", help="upload a weights file to the API (prints its id and tensors)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("file", metavar="FILE", help=".npy, .npz, .safetensors or a weights-only .pt")
    conn_args(p, read=True)
    p.set_defaults(handler=run(cmd_upload))
