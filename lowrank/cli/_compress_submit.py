"""`lowrank submit compress`: a compress job on the API, with `lowrank compress`'s flags where they apply.

    lowrank submit compress --source-job ID --method whiten --budget 0.25 [--finetune-epochs 1 --lr 0.01] [--wait]
    lowrank submit compress --upload ID --model resnet18 --image-size 8 --rank-ratio 0.25

The source is a succeeded train or compress job (`--source-job`, an id or its first characters) or an
upload (`--upload`, from `lowrank upload FILE`) with its architecture (`--model`). The other flags are
`lowrank compress`'s (lowrank/cli/compress.py), those a job spec has (core.compress_fields: the
service's fields); the fine-tuning flags are the training fields of core.compress_fields.FINETUNE_FIELDS.
"""
from __future__ import annotations

import argparse
from typing import Any

from lowrank.cli._common import CliError, flags_to_config
from lowrank.cli.compress import LATENCY_AWARE_HELP, add_finetune_flags, finetune_from_args

# lowrank compress's flags that are no job spec field: the source file's architecture hints (a job names a job
# or an upload) and --seed (every `lowrank submit` kind has its own).
_NOT_IN_SPEC = ("model", "num_classes", "seed")


def _flags() -> list[tuple[str, str, Any, str]]:
    from core.compress_fields import SERVICE_FIELDS
    from lowrank.cli.compress import _FLAGS

    service = {f.name for f in SERVICE_FIELDS}
    return [f for f in _FLAGS if f[1] in service and f[1] not in _NOT_IN_SPEC]


def register_submit(ksub: Any, common: Any, handler: Any) -> None:
    """Add `compress` to `lowrank submit`'s kinds; `common(parser)` adds the flags every kind has."""
    k = ksub.add_parser("compress", help="compress a trained network (a train/compress job's model or an upload)")
    source = k.add_mutually_exclusive_group(required=True)
    source.add_argument("--source-job", metavar="ID", help="a succeeded train or compress job (id or prefix)")
    source.add_argument("--upload", metavar="ID", help="an uploaded state_dict (`lowrank upload FILE`); give --model")
    k.add_argument("--model", help="the upload's architecture (resnet18, ...)")
    k.add_argument("--small-input", dest="small_input", action=argparse.BooleanOptionalAction, default=None,
                   help="the upload's stem: 3x3 stride 1 (default: read off a ResNet's weights)")
    for flag, key, _, text in _flags():
        if flag == "--device":
            text = "cpu or cuda (a GPU worker's queue)"
        k.add_argument(flag, dest=key, default=None, metavar=key.upper(), help=text)
    k.add_argument("--no-bn-reestimate", dest="bn_reestimate", action="store_false", default=None,
                   help="keep the source's BatchNorm statistics")
    k.add_argument("--latency-aware", action="store_true", help=LATENCY_AWARE_HELP)
    add_finetune_flags(k)
    common(k)
    k.set_defaults(handler=handler)


def spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The compress spec's fields from the flags given (the source's job id may still be a prefix)."""
    if args.upload is not None:
        if not args.model:
            raise CliError("--upload needs --model: the architecture of the uploaded state_dict (e.g. resnet18)")
        source: dict[str, Any] = {"upload": args.upload, "model": args.model}
        if args.small_input is not None:
            source["small_input"] = args.small_input
    else:
        if args.small_input is not None:
            raise CliError("--small-input is for an --upload (a job's model knows its stem)")
        source = {"job": args.source_job}
        if args.model:
            source["model"] = args.model
    spec = flags_to_config(args, _flags(), {"source": source})
    if not any(k in spec for k in ("budget", "rank", "rank_ratio")):
        raise CliError("give one of --budget, --rank, --rank-ratio")
    if args.bn_reestimate is False:
        spec["bn_reestimate"] = False
    if args.latency_aware:
        spec["latency_aware"] = True
    finetune = finetune_from_args(args)
    if finetune:
        spec["finetune"] = finetune
    return spec
