"""The `fibemrss` command: up, demo, ingest, diagnose, keys, certs, federation status, bench."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any


def write_endpoints(path: Path, endpoints: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2))
    tmp.replace(path)


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _workdir(arg: str | None) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    if arg:
        return Path(arg), None
    tmp = tempfile.TemporaryDirectory(prefix="fibemrss-")
    return Path(tmp.name), tmp


def cmd_up(args: argparse.Namespace) -> int:
    from fibemrss.local_cluster import DEMO_HOSPITALS, LocalCluster

    workdir, tmp = _workdir(args.workdir)
    hospitals = tuple(args.hospitals.split(",")) if args.hospitals else DEMO_HOSPITALS
    cluster = LocalCluster(workdir, hospitals, database_url=args.database_url)
    try:
        endpoints = cluster.start()
        if args.endpoints_json:
            write_endpoints(Path(args.endpoints_json), endpoints)
        print(json.dumps(endpoints, indent=2), flush=True)
        wait_for_signal()
    finally:
        cluster.stop()
        if tmp:
            tmp.cleanup()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fibemrss.demo import run_demo

    workdir, tmp = _workdir(args.workdir)
    try:
        run_demo(
            workdir,
            args.rounds,
            Path(args.json) if args.json else None,
            quiet=args.quiet,
            database_url=args.database_url,
            serve_endpoints=Path(args.endpoints_json) if args.serve else None,
        )
    finally:
        if tmp:
            tmp.cleanup()
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from fibemrss.he.keys import write_key_files

    hospital, aggregator = write_key_files(Path(args.out), overwrite=args.force)
    print(json.dumps({"hospital": str(hospital), "aggregator": str(aggregator)}))
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from fibemrss.certs import init_pki

    identities = ["aggregator@central", "operator@central"]
    for h in args.hospitals.split(","):
        identities += [f"{role}@{h}" for role in ("gateway", "agent", "inference", "operator")]
    paths = init_pki(Path(args.out), identities, args.hostnames.split(",") if args.hostnames else None)
    print(
        json.dumps(
            {
                "ca": str(Path(args.out) / "ca.crt"),
                "certs": {i: {"cert": str(p.cert), "key": str(p.key)} for i, p in paths.items()},
            },
            indent=2,
        )
    )
    return 0


def cmd_federation_status(args: argparse.Namespace) -> int:
    from fibemrss.channels import open_channel
    from fibemrss.cli_tls import tls_from_args
    from fibemrss.federation.v1 import federation_pb2 as pb
    from fibemrss.federation.v1 import federation_pb2_grpc

    with open_channel(args.aggregator, tls_from_args(args)) as ch:
        st = (
            federation_pb2_grpc.AggregatorServiceStub(ch)
            .GetFederationStatus(pb.GetFederationStatusRequest(task=args.task), timeout=10)
            .status
        )
    history = [
        {
            "round": r.round,
            "state": pb.RoundState.Name(r.state).removeprefix("ROUND_STATE_").lower(),
            "submitted": list(r.submitted),
            **({"failure": r.failure} if r.failure else {}),
        }
        for r in st.history
    ]
    out = {
        "task": st.task,
        "rounds": st.rounds,
        "quorum": st.quorum,
        "hospitals": list(st.hospitals),
        "current_round": st.current.round,
        "done": st.current.federation_done,
        "history": history,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"task {out['task']}: round {out['current_round']} of {out['rounds']} "
            f"(quorum {out['quorum']} of {len(out['hospitals'])}){' - done' if out['done'] else ''}"
        )
        for h in history:
            print(
                f"  round {h['round']:>3}  {h['state']:<11}  submitted: {', '.join(h['submitted']) or '-'}"
                + (f"  ({h['failure']})" if "failure" in h else "")
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fibemrss.cli_tls import add_tls_arguments

    p = argparse.ArgumentParser(prog="fibemrss", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start PostgreSQL and every service on loopback until SIGINT/SIGTERM")
    up.add_argument("--endpoints-json", help="write the service endpoints here once all are healthy")
    up.add_argument("--workdir", help="keep data, keys and logs here (default: a temporary folder)")
    up.add_argument("--hospitals", help="comma-separated hospital names (default: the four UCI hospitals)")
    up.add_argument("--database-url", help="use this PostgreSQL server instead of an embedded one")
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="federate the UCI heart-disease hospitals end to end")
    demo.add_argument("--rounds", type=int, default=15)
    demo.add_argument("--json", help="write rounds, final accuracy and the diagnosis here")
    demo.add_argument("--workdir")
    demo.add_argument("--database-url")
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument(
        "--serve", action="store_true", help="keep serving after the rounds until SIGINT/SIGTERM"
    )
    demo.add_argument(
        "--endpoints-json", default="endpoints.json", help="with --serve: where to write endpoints"
    )
    demo.set_defaults(func=cmd_demo)

    keys = sub.add_parser("keys", help="HE key ceremony").add_subparsers(dest="keys_command", required=True)
    init = keys.add_parser("init", help="write hospital.he (secret) and aggregator.he (public only)")
    init.add_argument("--out", required=True)
    init.add_argument("--force", action="store_true", help="overwrite existing key files")
    init.set_defaults(func=cmd_keys_init)

    certs = sub.add_parser("certs", help="mutual-TLS PKI").add_subparsers(dest="certs_command", required=True)
    cinit = certs.add_parser("init", help="a CA and one certificate per <role>@<site> identity")
    cinit.add_argument("--out", required=True)
    cinit.add_argument("--hospitals", required=True, help="comma-separated hospital names")
    cinit.add_argument("--hostnames", help="extra DNS names for the certificates (Service names)")
    cinit.set_defaults(func=cmd_certs_init)

    fed = sub.add_parser("federation", help="federation operations").add_subparsers(
        dest="fed_command", required=True
    )
    status = fed.add_parser("status", help="task, current round, who submitted, history")
    status.add_argument("--aggregator", required=True, help="HOST:PORT")
    status.add_argument("--task", default="heart-disease-v1")
    status.add_argument("--json", action="store_true")
    add_tls_arguments(status)
    status.set_defaults(func=cmd_federation_status)
    from fibemrss import bench_cli, diagnose_cli, ingest_cli, models_cli, quarantine_cli

    bench_cli.add_parser(sub)
    diagnose_cli.add_parser(sub)
    ingest_cli.add_parser(sub)
    quarantine_cli.add_parser(sub)
    models_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a CLI prints one clear line, not a traceback
        import grpc

        if isinstance(exc, grpc.RpcError):
            print(f"fibemrss: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        else:
            print(f"fibemrss: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
