"""The `fibemrss` command: one module per subcommand in `fibemrss.tools.commands`."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

import grpc

from fibemrss.tools.commands import (
    bench,
    certs,
    db,
    demo,
    diagnose,
    federation,
    ingest,
    keys,
    models,
    privacy,
    quarantine,
    report,
    study,
    up,
)

COMMANDS = (
    up,
    demo,
    ingest,
    quarantine,
    models,
    privacy,
    keys,
    certs,
    db,
    federation,
    diagnose,
    study,
    bench,
    report,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fibemrss",
        description=(
            "FIBEMRSS: up, demo, ingest, quarantine, models, privacy, keys, certs, db, federation, diagnose, study, "
            "bench, report"
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (a demo's cluster.stop()) still runs."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:
        print(f"fibemrss: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a CLI prints one clear line, not a traceback
        print(f"fibemrss: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
