"""`lowrank token create NAME [--admin]`, `lowrank token list`, `lowrank token revoke NAME|ID`.

These talk to the database directly (LOWRANK_DATABASE_URL), not to the API: creating the first
admin token must work before any token exists. `create` prints the token once, alone on its last
line (`TOKEN=$(lowrank token create ci | tail -n1)`); only its SHA-256 is stored.
"""
from __future__ import annotations

import argparse

from lowrank.cli._common import CliError, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="API tokens (LOWRANK_AUTH=required): create, list, revoke")
    tsub = p.add_subparsers(dest="token_command", metavar="TOKEN_COMMAND")
    tsub.required = True

    c = tsub.add_parser("create", help="create a token for NAME and print it once (last line)")
    c.add_argument("name", help="who the token speaks for: owner of what it creates (letters, digits, _ . @ + -)")
    c.add_argument("--admin", action="store_true", help="may cancel and retry everyone's jobs and sweeps")
    c.add_argument("--json", action="store_true", help="print a JSON object instead (token included)")
    c.set_defaults(handler=cmd_create)

    ls = tsub.add_parser("list", help="list tokens (never the tokens themselves)")
    ls.add_argument("--active", action="store_true", help="only tokens not revoked")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=cmd_list)

    r = tsub.add_parser("revoke", help="revoke the token with this ID, or every live token named NAME")
    r.add_argument("name_or_id")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(handler=cmd_revoke)


def _call(fn, *args, **kwargs):
    from jobs.errors import DomainError

    try:
        return fn(*args, **kwargs)
    except DomainError as exc:
        raise CliError(exc.message) from None
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise CliError(f"database error ({type(exc).__name__}): {first[:300]} "
                           "(is LOWRANK_DATABASE_URL right and migrated? `lowrank db upgrade`)") from None
        raise


def _record(rec) -> dict:
    return {"id": rec.id, "name": rec.name, "admin": rec.admin, "created_at": rec.created_at,
            "last_used_at": rec.last_used_at, "revoked_at": rec.revoked_at}


def cmd_create(args: argparse.Namespace) -> int:
    from jobs import auth

    rec, token = _call(auth.create_token, args.name, admin=args.admin)
    if args.json:
        print_json({**_record(rec), "token": token})
        return 0
    kind = "admin token" if rec.admin else "token"
    print(f"created {kind} {rec.id} for {rec.name!r}; it is shown only now, store it safely:")
    print(token, flush=True)
    return 0


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def cmd_list(args: argparse.Namespace) -> int:
    from jobs import auth

    records = _call(auth.list_tokens, include_revoked=not args.active)
    if args.json:
        print_json([_record(r) for r in records])
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(records)} API token(s)")
    for col in ("id", "name", "admin", "created (UTC)", "last used", "revoked"):
        table.add_column(col)
    for r in records:
        table.add_row(r.id, r.name, "yes" if r.admin else "", _when(r.created_at), _when(r.last_used_at),
                      _when(r.revoked_at))
    Console().print(table)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from jobs import auth

    records = _call(auth.revoke_tokens, args.name_or_id)
    if args.json:
        print_json([_record(r) for r in records])
        return 0
    for r in records:
        print(f"revoked token {r.id} ({r.name}{', admin' if r.admin else ''})")
    return 0
