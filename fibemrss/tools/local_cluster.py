"""Starts a whole federation on one machine: PostgreSQL and every service as its own process.

Used by `fibemrss up`, `fibemrss demo` and the end-to-end tests. Every server binds port 0 on
loopback and reports the port it got through a ready file; nothing is left running after stop().
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.db.admin import ensure_database
from fibemrss.db.embedded import EmbeddedPostgres
from fibemrss.db.migrate import migrate
from fibemrss.db.roles import AGGREGATOR_ROLES, ensure_service_login, login_name
from fibemrss.db.roles import HOSPITAL_ROLES as DB_ROLES
from fibemrss.domain.site_policy import SitePolicy, policy_to_json
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import get_task
from fibemrss.he.key_delivery import open_hospital_key, seal_hospital_key
from fibemrss.he.keys import write_key_files, write_private_file
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import DEFAULT_TASK, TlsFiles
from fibemrss.tools.certs import CRL_FILE, init_pki, revoke
from fibemrss.tools.service_process import ServiceProcess, base_env
from fibemrss.tools.study_review import document_of, propose_and_approve

log = logging.getLogger(__name__)

DEMO_HOSPITALS = ("cleveland", "hungary", "switzerland", "va-long-beach")
HOSPITAL_ROLES = ("gateway", "agent", "inference")


def demo_pseudonym_key(hospital: str) -> str:
    # Fixed per hospital so the seeded train/test split (a hash of the patient key) is the same in
    # every demo run. Real deployments set FIBEMRSS_PSEUDONYM_KEY from a Secret.
    return hashlib.sha256(f"fibemrss-demo-pseudonym|{hospital}".encode()).hexdigest()


def tls_for(endpoints: dict[str, Any], identity: str) -> TlsFiles | None:
    """The client TLS files of `identity` ("operator@cleveland") from an endpoints JSON, if TLS is on."""
    tls = endpoints.get("tls")
    if not tls:
        return None
    cert = tls["certs"][identity]
    return TlsFiles(tls["ca"], cert["cert"], cert["key"])


# The hospital console's sign-in (docs/console.md), passed from `fibemrss up`/`demo --serve`'s
# environment to every gateway: with them each hospital serves its console on loopback.
CONSOLE_OIDC_ENV = (
    "FIBEMRSS_OIDC_ISSUER",
    "FIBEMRSS_OIDC_CLIENT_ID",
    "FIBEMRSS_OIDC_CLIENT_SECRET_FILE",
    "FIBEMRSS_OIDC_ROLES",
    "FIBEMRSS_OIDC_GROUPS_CLAIM",
    "FIBEMRSS_OIDC_SCOPES",
    "FIBEMRSS_OIDC_CA_FILE",
)
CONSOLES_OFF = (
    "hospital consoles: off; set FIBEMRSS_OIDC_ISSUER, FIBEMRSS_OIDC_CLIENT_ID, "
    "FIBEMRSS_OIDC_CLIENT_SECRET_FILE and FIBEMRSS_OIDC_ROLES to serve one per hospital (docs/console.md)"
)


def console_oidc_from_env() -> dict[str, str]:
    return {k: os.environ[k] for k in CONSOLE_OIDC_ENV if os.environ.get(k)}


def console_lines(endpoints: dict[str, Any]) -> list[str]:
    """What `up` and `demo --serve` print about the hospital consoles: each one's address."""
    found = [(h, e["console"]) for h, e in endpoints["hospitals"].items() if e.get("console")]
    if not found:
        return [CONSOLES_OFF]
    return [f"console of {h}: {url} (sign-in: {url}/oidc/callback is its redirect URI)" for h, url in found]


def db_name(hospital: str) -> str:
    return "hospital_" + hospital.replace("-", "_")


@dataclass
class LocalCluster:
    workdir: Path
    hospitals: tuple[str, ...] = DEMO_HOSPITALS
    task: str = DEFAULT_TASK
    database_url: str | None = None  # a server to use instead of the embedded one
    extra_env: dict[str, str] = field(default_factory=dict)
    # Mutual TLS on every link, with a private CA made for this run (see fibemrss/tools/certs.py).
    tls: bool = True
    # Where agents reach the aggregator, given its real address: tests put a recording proxy
    # in between to inspect what crosses the wire.
    agents_reach_aggregator_via: Callable[[str], str] | None = None
    # Every hospital's site policy (FIBEMRSS_SITE_POLICY_FILE); None: the default policy.
    site_policy: SitePolicy | None = None
    # One embedded PostgreSQL per site (the aggregator's, each hospital's), as in a deployment,
    # so one site's database can be killed alone (`crash_database`); else one server for all.
    separate_databases: bool = False
    # FIBEMRSS_OIDC_* for every gateway's console (console_oidc_from_env); empty: no console.
    # `console_port`: hospital i's console on 127.0.0.1:<console_port + i> (0: any free port), so
    # that its redirect URI can be registered at the provider before it starts.
    console_oidc: dict[str, str] = field(default_factory=dict)
    console_port: int = 0
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    _pg: Any = None
    _site_pgs: dict[str, EmbeddedPostgres] = field(default_factory=dict)
    _db_urls: dict[str, str] = field(default_factory=dict)  # the owner's URL of each database
    # Each service's own login ((database, service) -> URL): docs/security.md, "Database roles".
    _service_urls: dict[tuple[str, str], str] = field(default_factory=dict)

    # -- start -----------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_database()
            self._make_certs()
            self._make_keys()
            deadline = time.monotonic() + timeout
            self._spawn("aggregator@central", self._service_env("aggregator", "central"))
            for h in self.hospitals:
                self._spawn(f"gateway@{h}", self._service_env("gateway", h))
            self._wait_ready(deadline)
            # Agents and inference services need their gateway's address.
            for h in self.hospitals:
                self._spawn(f"agent@{h}", self._service_env("agent", h))
                self._spawn(f"inference@{h}", self._service_env("inference", h))
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self.endpoints()

    def _start_database(self) -> None:
        names = ["aggregator", *(db_name(h) for h in self.hospitals)]
        if self.database_url:
            for n in names:
                self._db_urls[n] = ensure_database(self.database_url, n)
        elif self.separate_databases:
            for n in names:
                self._site_pgs[n] = EmbeddedPostgres(self.workdir / f"postgres-{n}")
                self._site_pgs[n].start()
                self._db_urls[n] = self._site_pgs[n].create_database(n)
        else:
            self._pg = EmbeddedPostgres(self.workdir / "postgres")
            self._pg.start()
            for n in names:
                self._db_urls[n] = self._pg.create_database(n)
        self._make_service_logins(names)

    def _make_service_logins(self, names: list[str]) -> None:
        """The deployment's database setup, as the owner: the migrations (once, here, rather than
        in every service), then one login per service and database, its password made once and
        kept 0600 beside the server's own (`db-roles/<login>.password`). Each service connects
        with its own login only, so a service finds no migration pending and changes no schema."""
        folder = self.workdir / "db-roles"
        folder.mkdir(mode=0o700, exist_ok=True)
        for n in names:
            schema, services = (
                ("aggregator", AGGREGATOR_ROLES) if n == "aggregator" else ("hospital", DB_ROLES)
            )
            migrate(self._db_urls[n], schema)
            for service in services:
                login = login_name(n, service)
                password_file = folder / f"{login}.password"
                if not password_file.exists():
                    write_private_file(password_file, secrets.token_urlsafe(24).encode())
                password = password_file.read_text().strip()
                self._service_urls[(n, service)] = ensure_service_login(
                    self._db_urls[n], service, login, password
                )

    def _make_keys(self) -> None:
        """The HE key ceremony of a deployment, in one process: the first hospital (the key
        holder) makes the key pair in its own folder (`keys/`); with TLS, every other hospital
        receives the secret key sealed to its own agent's certificate key and signed by the
        holder's agent (fibemrss.he.key_delivery), and opens it into its own folder
        (`keys/<hospital>/`), as `fibemrss keys seal` / `keys open` do across sites."""
        keys = self.workdir / "keys"
        if not (keys / "hospital.he").exists():
            write_key_files(keys)
        if not self.tls:
            return
        pki = self.workdir / "pki"
        holder = self.hospitals[0]
        ca = (pki / "ca.crt").read_bytes()
        for h in self.hospitals[1:]:
            own = keys / h / "hospital.he"
            if own.exists():
                continue
            sealed = seal_hospital_key(
                (keys / "hospital.he").read_bytes(),
                study=self.task,
                recipient_certificate_pem=(pki / f"agent@{h}.crt").read_bytes(),
                ca_pem=ca,
                signer_certificate_pem=(pki / f"agent@{holder}.crt").read_bytes(),
                signer_key_pem=(pki / f"agent@{holder}.key").read_bytes(),
            )
            opened = open_hospital_key(
                sealed,
                study=self.task,
                holder=holder,
                ca_pem=ca,
                certificate_pem=(pki / f"agent@{h}.crt").read_bytes(),
                private_key_pem=(pki / f"agent@{h}.key").read_bytes(),
            )
            own.parent.mkdir(parents=True, exist_ok=True)
            write_private_file(own, opened)

    def agent_secrets_key_file(self, hospital: str) -> Path:
        """The key `hospital`'s agent seals its secrets under (FIBEMRSS_AGENT_SECRETS_KEY_FILE):
        32 random bytes, base64, made once and kept 0600, as a Kubernetes Secret would hold it."""
        path = self.workdir / "keys" / hospital / "agent-secrets.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private_file(path, base64.b64encode(secrets.token_bytes(32)))
        return path

    def hospital_key_file(self, hospital: str) -> Path:
        """The HE secret key file of `hospital`'s agent (the holder's own, or the one it opened)."""
        own = self.workdir / "keys" / hospital / "hospital.he"
        return own if self.tls and hospital != self.hospitals[0] else self.workdir / "keys" / "hospital.he"

    def _aggregator_for_agents(self) -> str:
        address = self.processes["aggregator@central"].address
        return self.agents_reach_aggregator_via(address) if self.agents_reach_aggregator_via else address

    def identities(self) -> list[str]:
        out = ["aggregator@central", "operator@central"]
        for h in self.hospitals:
            out += [f"{role}@{h}" for role in (*HOSPITAL_ROLES, "operator", "ehr", "ingest")]
        return out

    def _make_certs(self) -> None:
        if not self.tls:
            return

        pki = self.workdir / "pki"
        if not (pki / "ca.crt").exists():
            init_pki(pki, self.identities())
        if not (pki / CRL_FILE).exists() and (pki / "ca.key").exists():
            # An empty revocation list that every service enforces: `fibemrss certs revoke
            # --ca-dir <workdir>/pki` withdraws a certificate from the running cluster.
            revoke(pki)

    def client_tls(self, identity: str) -> TlsFiles | None:
        if not self.tls:
            return None
        pki = self.workdir / "pki"
        return TlsFiles(str(pki / "ca.crt"), str(pki / f"{identity}.crt"), str(pki / f"{identity}.key"))

    def _service_env(self, role: str, where: str) -> dict[str, str]:
        env = base_env()
        env.update(self.extra_env)
        env["FIBEMRSS_TASK"] = self.task
        if role == "aggregator":
            env["DATABASE_URL"] = self._service_urls[("aggregator", "aggregator")]
            env["FIBEMRSS_HE_CONTEXT"] = str(self.workdir / "keys" / "aggregator.he")
        else:
            env["DATABASE_URL"] = self._service_urls[(db_name(where), role)]
            env["FIBEMRSS_HOSPITAL"] = where
        if role == "agent":
            env["FIBEMRSS_HE_CONTEXT"] = str(self.hospital_key_file(where))
            env["FIBEMRSS_AGENT_SECRETS_KEY_FILE"] = str(self.agent_secrets_key_file(where))
            env["FIBEMRSS_AGGREGATOR"] = self._aggregator_for_agents()
        if role in ("agent", "inference"):
            env["FIBEMRSS_GATEWAY"] = self.processes[f"gateway@{where}"].address
        if role == "gateway":
            env["FIBEMRSS_PSEUDONYM_KEY"] = demo_pseudonym_key(where)
            if self.site_policy is not None:
                policy_file = self.workdir / "site-policy.json"
                policy_file.write_text(json.dumps(policy_to_json(self.site_policy)))
                env["FIBEMRSS_SITE_POLICY_FILE"] = str(policy_file)
            if self.console_oidc:
                env.update(self.console_oidc)
                port = self.console_port + self.hospitals.index(where) if self.console_port else 0
                env["FIBEMRSS_CONSOLE_PLAINTEXT_LISTEN"] = f"127.0.0.1:{port}"
        # The non-gRPC edges: mutual TLS when the cluster has it, else plaintext on loopback.
        edge = "_LISTEN" if self.tls else "_PLAINTEXT_LISTEN"
        if role == "gateway":
            env[f"FIBEMRSS_MLLP{edge}"] = "127.0.0.1:0"
        if role in ("gateway", "inference"):
            env[f"FIBEMRSS_HTTP{edge}"] = "127.0.0.1:0"
        if (tls := self.client_tls(f"{role}@{where}")) is not None:
            env.update(
                {"FIBEMRSS_TLS_CA": tls.ca, "FIBEMRSS_TLS_CERT": tls.cert, "FIBEMRSS_TLS_KEY": tls.key}
            )
            crl = self.workdir / "pki" / CRL_FILE
            if crl.exists():
                env["FIBEMRSS_TLS_CRL"] = str(crl)
        return env

    def _spawn(self, name: str, env: dict[str, str]) -> None:
        sp = ServiceProcess(name, env, self.workdir)
        sp.start()
        self.processes[name] = sp

    def _wait_ready(self, deadline: float) -> None:
        for sp in self.processes.values():
            if not sp.address:
                sp.wait_ready(deadline)
                self._check_health(sp, deadline)

    def _check_health(self, sp: ServiceProcess, deadline: float) -> None:
        with open_channel(
            sp.address, self.client_tls(f"operator@{sp.name.split('@')[1]}"), sp.name
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=max(deadline - time.monotonic(), 1.0)
            )
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError(f"{sp.name} is not serving")

    # -- what is running ---------------------------------------------------------------------------
    def endpoints(self) -> dict[str, Any]:
        return {
            "aggregator": self.processes["aggregator@central"].address,
            "hospitals": {
                h: {
                    **{r: self.processes[f"{r}@{h}"].address for r in HOSPITAL_ROLES},
                    # "mllp" (HOST:PORT) and "fhir" (a base URL) from the gateway, "kserve_http" from inference
                    **{k: v for r in HOSPITAL_ROLES for k, v in self.processes[f"{r}@{h}"].edges.items()},
                }
                for h in self.hospitals
            },
            "metrics": {name: f"http://{sp.metrics}/metrics" for name, sp in self.processes.items()},
            "tls": None
            if not self.tls
            else {
                "ca": str(self.workdir / "pki" / "ca.crt"),
                # The CA's revocation list every service enforces: `fibemrss certs revoke
                # --ca-dir <this folder> --cert <identity>.crt` withdraws a certificate.
                "crl": str(self.workdir / "pki" / CRL_FILE),
                "certs": {
                    i: {
                        "cert": str(self.workdir / "pki" / f"{i}.crt"),
                        "key": str(self.workdir / "pki" / f"{i}.key"),
                    }
                    for i in self.identities()
                },
            },
        }

    def approve_study(self, task: TaskSpec | None = None) -> str:
        """Proposes the study (the cluster's task by default) as operator@central and has every
        hospital's operator review and approve it, as the demo does; its hash. Call it once the
        hospitals' records are in: approval counts the eligible patients."""
        study = task or get_task(self.task)
        digest, _ = propose_and_approve(self.endpoints(), self.hospitals, document_of(study), tls_for)
        return digest

    def database_url_for(self, name: str) -> str:
        """The owner's URL of database `name` (tests inspect and attack it with it)."""
        return self._db_urls[name]

    def service_database_url(self, name: str, service: str) -> str:
        """The URL `service` connects to database `name` with: its own login."""
        return self._service_urls[(name, service)]

    def pid(self, name: str) -> int:
        process = self.processes[name].process
        assert process is not None
        return process.pid

    def restart(
        self,
        name: str,
        kill: bool = True,
        timeout: float = 60.0,
        while_down: Callable[[], None] | None = None,
    ) -> None:
        """Kills one service (SIGKILL by default, as a crash) and starts it again with the same env;
        `while_down` runs between the two (what the rest of the federation does meanwhile)."""
        sp = self.processes[name]
        role, where = name.split("@")
        env = self._service_env(role, where)
        # Keep the same port, so peers holding a channel to it reconnect on their own.
        env["FIBEMRSS_LISTEN"] = sp.address
        sp.signal(signal.SIGKILL if kill else signal.SIGTERM)
        sp.wait(30)
        if while_down is not None:
            while_down()
        self._spawn(name, env)
        self._wait_ready(time.monotonic() + timeout)

    def crash_database(self, name: str, down_seconds: float = 1.0) -> None:
        """kill -9 of the PostgreSQL holding database `name` ("aggregator", `db_name(h)`), which
        must be a separate server, then the same server started again on the same port."""
        pg = self._site_pgs[name]
        pg.kill()
        time.sleep(down_seconds)
        pg.start()

    # -- stop ----------------------------------------------------------------------------------------
    def stop(self, grace: float = 15.0) -> None:
        # Signal everyone first, so they drain in parallel, then wait for each.
        for sp in self.processes.values():
            sp.signal(signal.SIGTERM)
        end = time.monotonic() + grace
        try:
            for sp in self.processes.values():
                sp.wait(end - time.monotonic())
        finally:
            if self._pg is not None:
                self._pg.stop()
                self._pg = None
            for pg in self._site_pgs.values():
                pg.stop()
            self._site_pgs.clear()
