"""`tsdia status|logs|sync`: follow experiments from a login node (`tsdia-train`/`tsdia-submit` stay as they are).

tsdia status [PATH ...] [--json] [--watch [SECONDS]] [--all]
tsdia logs DIR [-f] [--rank R] [--attempt N]
tsdia sync DIR [DIR ...]
tsdia export EXPERIMENT -o OUT [--average-best N] [--metric M] [--ema] [--dtype fp32|bf16]  (see tsdia.export)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tsdia.cli import run_cli
from tsdia.export import add_export_parser

PROG = "tsdia"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Follow tsdia experiments.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="one row per experiment: state, progress, ETA, best metric")
    status.add_argument("paths", nargs="*", default=["runs"], help="where to look (default: runs/)")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    status.add_argument(
        "--watch", nargs="?", type=float, const=10.0, metavar="SECONDS", help="redraw every SECONDS (10)"
    )
    status.add_argument("--all", action="store_true", help="also show finished experiments older than a week")

    logs = commands.add_parser("logs", help="print (or follow) the current attempt's log")
    logs.add_argument("directory", help="the experiment directory")
    logs.add_argument("-f", "--follow", action="store_true", help="follow across requeues until the job ends")
    logs.add_argument("--rank", type=int, default=0, help="whose log (default: rank 0)")
    logs.add_argument("--attempt", type=int, help="attempt N (0: the first; default: the newest)")
    logs.add_argument("--member", help="with a sweep directory: the member's name (its directory)")

    sync = commands.add_parser("sync", help="upload the offline WandB runs of experiments")
    sync.add_argument("directories", nargs="+", help="experiment directories")
    add_export_parser(commands)
    return parser


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return _status(args)
    if args.command == "logs":
        from tsdia.follow import logs

        root = logs.resolve_member(Path(args.directory), args.member)
        if args.follow:
            logs.follow(root, args.rank, args.attempt)
        else:
            logs.print_log(root, args.rank, args.attempt)
        return 0
    if args.command == "export":
        from tsdia.export import run_export

        return run_export(args, argv)
    from tsdia.follow.sync import sync

    uploaded = sync([Path(d) for d in args.directories])
    print(
        f"{PROG} sync: uploaded {len(uploaded)} offline run(s)"
        if uploaded
        else f"{PROG} sync: nothing to upload"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from tsdia.follow import status

    while True:
        now = time.time()
        rows, hidden = status.visible(status.collect(args.paths), args.all, now)
        if args.json:
            text = json.dumps(status.as_json(rows), indent=2)
        else:
            text = (
                status.format_table(rows, Path.cwd())
                if rows
                else f"no tsdia experiments under {' '.join(args.paths)}"
            )
            if hidden:
                text += f"\n({hidden} finished more than a week ago hidden; --all shows them)"
        if args.watch:
            sys.stdout.write("\x1b[H\x1b[2J")  # clear the terminal, then redraw
        print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
