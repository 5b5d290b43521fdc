"""Configuration from environment variables (12-factor); see the table in README.md."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from fibemrss.domain.errors import ConfigError, InvalidArgument, NotFound
from fibemrss.domain.site_policy import SitePolicy, parse_site_policy
from fibemrss.domain.study import parse_study
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import get_task, register
from fibemrss.platform.capacity import CallLimits
from fibemrss.platform.revocation import revocations_for

DEFAULT_TASK = "heart-disease-v1"


def env_str(name: str, default: str | None = None) -> str:
    """The variable's value, or `default`; with no default a missing variable stops start-up."""
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"environment variable {name} is required but not set")
        return default
    return value


def env_optional(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a number") from None


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def call_limits_from_env(default: CallLimits) -> CallLimits:
    limits = CallLimits(
        max_workers=env_int("FIBEMRSS_MAX_WORKERS", default.max_workers),
        per_identity=env_int("FIBEMRSS_MAX_CALLS_PER_IDENTITY", default.per_identity),
        waiting_streams=env_int("FIBEMRSS_MAX_WATCH_STREAMS", default.waiting_streams),
        max_stream_seconds=env_float("FIBEMRSS_MAX_STREAM_SECONDS", default.max_stream_seconds),
        max_call_seconds=env_float("FIBEMRSS_MAX_CALL_SECONDS", default.max_call_seconds),
    )
    limits.validate()
    return limits


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str
    # The federation CA's revocation list (FIBEMRSS_TLS_CRL; fibemrss.platform.revocation).
    crl: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    """What every service's bootstrap needs."""

    listen: str
    metrics_listen: str
    tls: TlsFiles | None
    # When set, the bound addresses are written here as JSON once the server is ready
    # (how `fibemrss up` learns the ports chosen for port 0).
    ready_file: str | None
    # A plaintext port that serves only grpc.health.v1, for Kubernetes' gRPC probes, which
    # cannot present a client certificate to the mutual-TLS port.
    health_listen: str | None = None
    # Worker threads and what one caller may hold of them (fibemrss/platform/capacity.py).
    limits: CallLimits = field(default_factory=CallLimits)

    def __post_init__(self) -> None:
        # Fail closed: without mutual TLS there is no caller identity and so no authorization;
        # such a server may listen only where nothing but this machine can reach it.
        if self.tls is None:
            require_loopback(
                self.listen,
                "FIBEMRSS_LISTEN",
                "without mutual TLS (FIBEMRSS_TLS_CA, FIBEMRSS_TLS_CERT, FIBEMRSS_TLS_KEY unset) a service "
                "serves only on a loopback address such as 127.0.0.1; set the three FIBEMRSS_TLS_* "
                "variables to listen on it",
            )

    @classmethod
    def from_env(cls, default_limits: CallLimits | None = None) -> ServerConfig:
        ca, cert, key = (
            env_optional("FIBEMRSS_TLS_CA"),
            env_optional("FIBEMRSS_TLS_CERT"),
            env_optional("FIBEMRSS_TLS_KEY"),
        )
        given = [v for v in (ca, cert, key) if v]
        if given and len(given) != 3:
            raise ConfigError("FIBEMRSS_TLS_CA, FIBEMRSS_TLS_CERT and FIBEMRSS_TLS_KEY must be set together")
        crl = env_optional("FIBEMRSS_TLS_CRL")
        if crl and not given:
            raise ConfigError("FIBEMRSS_TLS_CRL needs mutual TLS: set FIBEMRSS_TLS_CA, FIBEMRSS_TLS_CERT and FIBEMRSS_TLS_KEY")
        tls = TlsFiles(ca, cert, key, crl) if ca and cert and key else None
        # Read before anything else starts (a list the CA did not sign could lift revocations);
        # the process's servers, edges and signature checks then share this one list.
        revocations_for(tls)
        return cls(
            listen=env_str("FIBEMRSS_LISTEN", "127.0.0.1:0"),
            metrics_listen=env_str("FIBEMRSS_METRICS_LISTEN", "127.0.0.1:0"),
            tls=tls,
            ready_file=env_optional("FIBEMRSS_READY_FILE"),
            health_listen=env_optional("FIBEMRSS_HEALTH_LISTEN"),
            limits=call_limits_from_env(default_limits or CallLimits()),
        )


def split_host_port(address: str, variable: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{variable}={address!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def task_from_env() -> TaskSpec:
    """The study a service works on: FIBEMRSS_STUDY_FILE (a study document, registered so that
    the service also answers for it by name) or a shipped study named by FIBEMRSS_TASK."""
    path = env_optional("FIBEMRSS_STUDY_FILE")
    if path:
        try:
            content = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"FIBEMRSS_STUDY_FILE: cannot read {path}: {exc.strerror}") from None
        try:
            task = register(parse_study(content, "FIBEMRSS_STUDY_FILE"))
        except InvalidArgument as exc:
            fields = "; ".join(f"{v.field} {v.description}" for v in exc.violations)
            raise ConfigError(f"FIBEMRSS_STUDY_FILE: {exc}: {fields}") from None
        named = env_optional("FIBEMRSS_TASK")
        if named and named != task.name:
            raise ConfigError(f"FIBEMRSS_TASK is {named!r} but FIBEMRSS_STUDY_FILE holds {task.name!r}")
        return task
    return get_task(env_str("FIBEMRSS_TASK", DEFAULT_TASK))


@dataclass(frozen=True)
class StudySelection:
    """The studies a hospital service works on (FIBEMRSS_STUDIES): those named, and with
    `approved` every other study whose latest decision at this hospital is an approval (its
    document as approved, read from the hospital's database, followed without a restart)."""

    named: tuple[TaskSpec, ...]
    approved: bool = False


def studies_from_env() -> StudySelection:
    """FIBEMRSS_STUDIES: a comma-separated list of shipped study names, study document files and
    the word `approved`. Unset: the one study of FIBEMRSS_STUDY_FILE / FIBEMRSS_TASK, as before."""
    raw = env_optional("FIBEMRSS_STUDIES")
    if raw is None:
        return StudySelection((task_from_env(),))
    named: dict[str, TaskSpec] = {}
    approved = False
    if env_optional("FIBEMRSS_STUDY_FILE"):
        task = task_from_env()  # the one document given the old way joins the list
        named[task.name] = task
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise ConfigError("FIBEMRSS_STUDIES: names no study (a list of study names, files or `approved`)")
    for item in items:
        if item == "approved":
            approved = True
            continue
        if item.endswith((".yaml", ".yml", ".json")) or "/" in item:
            try:
                content = Path(item).read_bytes()
            except OSError as exc:
                raise ConfigError(f"FIBEMRSS_STUDIES: cannot read {item}: {exc.strerror}") from None
            try:
                task = register(parse_study(content, f"FIBEMRSS_STUDIES ({item})"))
            except InvalidArgument as exc:
                fields = "; ".join(f"{v.field} {v.description}" for v in exc.violations)
                raise ConfigError(f"FIBEMRSS_STUDIES: {item}: {exc}: {fields}") from None
        else:
            try:
                task = get_task(item)
            except NotFound as exc:
                raise ConfigError(f"FIBEMRSS_STUDIES: {exc}") from None
        if task.name in named and named[task.name] != task:
            raise ConfigError(f"FIBEMRSS_STUDIES: two different documents are named {task.name!r}")
        named[task.name] = task
    legacy = env_optional("FIBEMRSS_TASK")
    if legacy and legacy not in named:
        raise ConfigError(f"FIBEMRSS_TASK is {legacy!r} but FIBEMRSS_STUDIES does not list it")
    return StudySelection(tuple(named.values()), approved)


def site_policy_from_file(path: str) -> SitePolicy:
    """FIBEMRSS_SITE_POLICY_FILE: the hospital's site policy document (docs/studies.md)."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"FIBEMRSS_SITE_POLICY_FILE: cannot read {path}: {exc.strerror}") from None
    try:
        return parse_site_policy(content, "FIBEMRSS_SITE_POLICY_FILE")
    except InvalidArgument as exc:
        fields = "; ".join(f"{v.field} {v.description}" for v in exc.violations)
        raise ConfigError(f"FIBEMRSS_SITE_POLICY_FILE: {exc}: {fields}") from None


@dataclass(frozen=True)
class EdgeListen:
    """Where a non-gRPC edge (MLLP, HTTPS) listens; `tls` None only on a named loopback address."""

    host: str
    port: int
    tls: TlsFiles | None


def edge_listen(variable: str, plaintext_variable: str, tls: TlsFiles | None) -> EdgeListen | None:
    """An edge's address from `variable` (mutual TLS, with the service's FIBEMRSS_TLS_* files) or,
    only when explicitly asked, from `plaintext_variable`, which must name a loopback address.
    None when neither is set: the edge is off."""
    listen, plaintext = env_optional(variable), env_optional(plaintext_variable)
    if listen and plaintext:
        raise ConfigError(f"set either {variable} or {plaintext_variable}, not both")
    if listen:
        if tls is None:
            raise ConfigError(
                f"{variable} needs mutual TLS (FIBEMRSS_TLS_CA/CERT/KEY); for plaintext on a local "
                f"address set {plaintext_variable} instead"
            )
        host, port = split_host_port(listen, variable)
        return EdgeListen(host, port, tls)
    if plaintext:
        host, port = require_loopback(
            plaintext, plaintext_variable, "plaintext is allowed only on a loopback address such as 127.0.0.1"
        )
        return EdgeListen(host, port, None)
    return None


def require_loopback(address: str, variable: str, reason: str) -> tuple[str, int]:
    """The one rule for every listener without TLS (gRPC, MLLP, HTTP): (host, port) of `address`
    when its host is a loopback address, else a ConfigError naming `variable`, its value and
    `reason`. An empty host (":50051") means every address, so it is refused."""
    host, port = split_host_port(address, variable)
    if not _is_loopback(host):
        raise ConfigError(f"{variable}={address!r} is not a loopback address: {reason}")
    return host, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
