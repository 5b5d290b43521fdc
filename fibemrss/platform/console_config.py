"""The web console's settings from environment variables (README, "Configuration"; docs/console.md).

The console is off unless FIBEMRSS_CONSOLE_LISTEN (HTTPS, with FIBEMRSS_CONSOLE_TLS_CERT/KEY: a
certificate browsers or the ingress trust) or FIBEMRSS_CONSOLE_PLAINTEXT_LISTEN (a loopback
address only) is set. It never starts without its OpenID Connect settings: there is no other way
to sign in, and no console without sign-in. Each refusal names the variable (fail closed, like
every other edge without TLS off loopback).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fibemrss.domain.errors import ConfigError
from fibemrss.platform.authorization import CONSOLE_ROLES
from fibemrss.platform.config import (
    EdgeListen,
    TlsFiles,
    env_int,
    env_optional,
    env_str,
    require_loopback,
    split_host_port,
)
from fibemrss.platform.oidc import OidcSettings, parse_role_map
from fibemrss.platform.web_sessions import DEFAULT_IDLE_SECONDS, DEFAULT_MAX_SECONDS

LISTEN = "FIBEMRSS_CONSOLE_LISTEN"
PLAINTEXT_LISTEN = "FIBEMRSS_CONSOLE_PLAINTEXT_LISTEN"
CALLBACK_PATH = "/oidc/callback"


@dataclass(frozen=True)
class ConsoleConfig:
    listen: EdgeListen
    public_url: str | None  # FIBEMRSS_CONSOLE_URL; None: the address it binds
    oidc: OidcSettings  # redirect_uri filled in once the address is known
    idle_seconds: float
    max_seconds: float

    def redirect_uri(self, bound_base_url: str) -> str:
        return (self.public_url or bound_base_url).rstrip("/") + CALLBACK_PATH


def _loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        require_loopback(f"{host}:0", "", "")
    except ConfigError:
        return False
    return True


def console_from_env(roles: frozenset[str] = CONSOLE_ROLES) -> ConsoleConfig | None:
    listen, plaintext = env_optional(LISTEN), env_optional(PLAINTEXT_LISTEN)
    if listen and plaintext:
        raise ConfigError(f"set either {LISTEN} or {PLAINTEXT_LISTEN}, not both")
    if not listen and not plaintext:
        return None
    if listen:
        cert, key = env_optional("FIBEMRSS_CONSOLE_TLS_CERT"), env_optional("FIBEMRSS_CONSOLE_TLS_KEY")
        if not cert or not key:
            missing = "FIBEMRSS_CONSOLE_TLS_CERT" if not cert else "FIBEMRSS_CONSOLE_TLS_KEY"
            raise ConfigError(
                f"{LISTEN} serves HTTPS and needs {missing} (a certificate the browsers or the ingress "
                f"trust); for plain HTTP on a local address set {PLAINTEXT_LISTEN} instead"
            )
        host, port = split_host_port(listen, LISTEN)
        edge = EdgeListen(host, port, TlsFiles("", cert, key))
    else:
        assert plaintext is not None
        host, port = require_loopback(
            plaintext, PLAINTEXT_LISTEN, "plain HTTP is allowed only on a loopback address such as 127.0.0.1"
        )
        edge = EdgeListen(host, port, None)
    # Without these there is no sign-in, so no console: fail closed, naming the variable.
    issuer = env_str("FIBEMRSS_OIDC_ISSUER")
    if urlsplit(issuer).scheme != "https" and not _loopback_url(issuer):
        raise ConfigError(f"FIBEMRSS_OIDC_ISSUER={issuer!r} must be an https:// URL (http only on loopback)")
    client_id = env_str("FIBEMRSS_OIDC_CLIENT_ID")
    secret_file = env_str("FIBEMRSS_OIDC_CLIENT_SECRET_FILE")
    try:
        secret = Path(secret_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"FIBEMRSS_OIDC_CLIENT_SECRET_FILE={secret_file!r} cannot be read: {exc.strerror}"
        ) from None
    if not secret:
        raise ConfigError(f"FIBEMRSS_OIDC_CLIENT_SECRET_FILE={secret_file!r} is empty")
    role_map = parse_role_map(env_str("FIBEMRSS_OIDC_ROLES"), "FIBEMRSS_OIDC_ROLES", roles)
    public_url = env_optional("FIBEMRSS_CONSOLE_URL")
    if public_url and urlsplit(public_url).scheme not in ("https", "http"):
        raise ConfigError(f"FIBEMRSS_CONSOLE_URL={public_url!r} must be the console's http(s):// address")
    if public_url and urlsplit(public_url).scheme == "http" and not _loopback_url(public_url):
        raise ConfigError(f"FIBEMRSS_CONSOLE_URL={public_url!r} must be https:// off loopback")
    settings = OidcSettings(
        issuer=issuer,
        client_id=client_id,
        client_secret=secret,
        redirect_uri="",
        roles_by_group=role_map,
        groups_claim=env_str("FIBEMRSS_OIDC_GROUPS_CLAIM", "groups"),
        scopes=env_str("FIBEMRSS_OIDC_SCOPES", "openid profile"),
        ca_file=env_optional("FIBEMRSS_OIDC_CA_FILE"),
    )
    idle = env_int("FIBEMRSS_CONSOLE_SESSION_IDLE_SECONDS", int(DEFAULT_IDLE_SECONDS))
    longest = env_int("FIBEMRSS_CONSOLE_SESSION_MAX_SECONDS", int(DEFAULT_MAX_SECONDS))
    if idle <= 0 or longest <= 0:
        raise ConfigError("FIBEMRSS_CONSOLE_SESSION_IDLE_SECONDS and _MAX_SECONDS must be positive")
    return ConsoleConfig(edge, public_url, settings, float(idle), float(longest))
