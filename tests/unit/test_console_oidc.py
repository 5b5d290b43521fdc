"""The console's sign-in checks, attacked one at a time: an id_token is accepted only when signed
by the provider's published key with an allowed algorithm, issued by the configured issuer to this
client, not expired, and bound to the sign-in's nonce; a callback only for a sign-in this console
started, once; groups map to roles by configuration, and no role means no console. The whole flow
against a real provider runs in tests/browser."""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from fibemrss.domain.errors import ConfigError, PermissionDenied, Unauthenticated
from fibemrss.platform.authorization import (
    CENTRAL_CONSOLE_ROLES,
    CENTRAL_CONSOLE_RULES,
    CONSOLE_ROLES,
    CONSOLE_RULES,
    console_authorize,
)
from fibemrss.platform.oidc import OidcClient, OidcSettings, SignedIn, parse_role_map, s256
from fibemrss.platform.web_sessions import SessionStore

ISSUER = "https://idp.h1.example"
CLIENT = "fibemrss-console"
PROVIDER_KEY = RSAKey.generate_key(2048, private=True, parameters={"kid": "provider"})
OTHER_KEY = RSAKey.generate_key(
    2048, private=True, parameters={"kid": "provider"}
)  # same kid, not the provider's


def client(now: float | None = None) -> OidcClient:
    settings = OidcSettings(
        ISSUER, CLIENT, "secret", "https://console.h1.example/oidc/callback", {"stewards": "steward"}
    )
    c = OidcClient(settings, clock=(lambda: now) if now is not None else time.time)
    c._metadata = {
        "issuer": ISSUER,
        "authorization_endpoint": ISSUER + "/auth",
        "token_endpoint": ISSUER + "/token",
    }
    c._keys = KeySet([RSAKey.import_key(PROVIDER_KEY.as_dict(private=False))])
    return c


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": CLIENT,
        "sub": "u-4f2c",
        "name": "Dana Reyes",
        "groups": ["stewards"],
        "iat": now,
        "exp": now + 300,
        "nonce": "n-1",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def token(body: dict[str, Any], key: RSAKey = PROVIDER_KEY, alg: str = "RS256") -> str:
    return jwt.encode({"alg": alg, "kid": "provider"}, body, key)


def test_a_token_from_the_provider_for_this_client_and_sign_in_is_accepted() -> None:
    c = client()
    person = c.person(c.verify_id_token(token(claims()), "n-1"))
    assert person == SignedIn("u-4f2c", "Dana Reyes", frozenset({"steward"}), ("stewards",))


@pytest.mark.parametrize(
    ("attack", "forged", "nonce"),
    [
        ("signed with another key", token(claims(), OTHER_KEY), "n-1"),
        ("another issuer", token(claims(iss="https://evil.example")), "n-1"),
        ("issued to another client", token(claims(aud="another-app")), "n-1"),
        ("several audiences, azp another client", token(claims(aud=[CLIENT, "x"], azp="x")), "n-1"),
        ("expired", token(claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)), "n-1"),
        ("no expiry", token(claims(exp=None)), "n-1"),
        ("another sign-in's nonce (replay)", token(claims()), "n-2"),
        ("no nonce", token(claims(nonce=None)), "n-1"),
        ("no subject", token(claims(sub=None)), "n-1"),
    ],
)
def test_a_forged_or_misdirected_id_token_is_refused(attack: str, forged: str, nonce: str) -> None:
    with pytest.raises(Unauthenticated):
        client().verify_id_token(forged, nonce)


def test_an_unsigned_token_is_refused() -> None:
    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    unsigned = f"{part({'alg': 'none'})}.{part(claims())}."
    with pytest.raises(Unauthenticated):
        client().verify_id_token(unsigned, "n-1")
    with pytest.raises(Unauthenticated):
        client().verify_id_token("not a token", "n-1")


def test_a_callback_is_accepted_only_for_a_sign_in_started_here_by_this_browser_and_only_once() -> None:
    now = [1000.0]
    c = client()
    c.clock = lambda: now[0]

    def begin(path: str) -> tuple[dict[str, str], str]:
        url, browser = c.begin(path)
        return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}, browser

    q, browser = begin("/studies")
    assert (q["response_type"], q["client_id"], q["code_challenge_method"]) == ("code", CLIENT, "S256")
    assert q["code_challenge"] != s256(q["state"]) and len(q["nonce"]) >= 32 and browser not in q.values()
    with pytest.raises(Unauthenticated, match="not started here"):
        c.finish("made-up-state", "code", None, browser)
    # Login CSRF: the attacker's own sign-in answer, opened in the victim's browser (which holds
    # no secret, or its own), is refused before the code is exchanged.
    attacker, _ = begin("/")
    with pytest.raises(Unauthenticated, match="another browser"):
        c.finish(attacker["state"], "code", None, browser)
    mixed, mixed_browser = begin("/")
    with pytest.raises(Unauthenticated, match="another issuer"):  # RFC 9207: a mix-up is refused
        c.finish(mixed["state"], "code", "https://evil.example", mixed_browser)
    now[0] += 601  # pending sign-ins are forgotten after 10 minutes
    with pytest.raises(Unauthenticated, match="not started here"):
        c.finish(q["state"], "code", None, browser)
    # ...and a state is used once (popped before the provider is asked anything).
    with pytest.raises(Unauthenticated, match="not started here"):
        c.finish(q["state"], "code", None, browser)


def test_groups_map_to_roles_and_no_role_is_no_console() -> None:
    c = client()
    with pytest.raises(PermissionDenied, match="no console role"):
        c.person(claims(groups=["cafeteria"]))
    assert parse_role_map("a=steward, b=auditor", "V", CONSOLE_ROLES) == {"a": "steward", "b": "auditor"}
    for bad in ("a=admin", "a", "", "=steward"):
        with pytest.raises(ConfigError, match="^V"):
            parse_role_map(bad, "V", CONSOLE_ROLES)


@pytest.mark.parametrize(
    ("roles", "action", "allowed"),
    [
        ({"steward"}, "console.decide_study", True),
        ({"steward"}, "console.resolve_quarantine", True),
        ({"steward"}, "console.set_budget", True),
        ({"steward"}, "console.retire_model", True),
        ({"steward"}, "console.search_audit", True),
        ({"auditor"}, "console.search_audit", True),
        ({"auditor"}, "console.read", True),
        ({"auditor"}, "console.decide_study", False),
        ({"auditor"}, "console.review_study", False),
        ({"auditor"}, "console.resolve_quarantine", False),
        ({"auditor"}, "console.read_quarantine", False),
        ({"auditor"}, "console.set_budget", False),
        ({"auditor"}, "console.retire_model", False),
        ({"steward"}, "console.something_new", False),  # an action without a rule is closed
        (set(), "console.read", False),
    ],
)
def test_the_console_role_matrix(roles: set[str], action: str, allowed: bool) -> None:
    if allowed:
        console_authorize("Dana", frozenset(roles), action)
    else:
        with pytest.raises(PermissionDenied):
            console_authorize("Dana", frozenset(roles), action)
    assert action in CONSOLE_RULES or not allowed


def test_the_federation_console_is_the_operators_alone() -> None:
    console_authorize("Olu", frozenset({"operator"}), "console.read_federations", CENTRAL_CONSOLE_RULES)
    for roles in ({"steward"}, {"auditor"}, set()):
        with pytest.raises(PermissionDenied):
            console_authorize("Dana", frozenset(roles), "console.read_federations", CENTRAL_CONSOLE_RULES)
    with pytest.raises(PermissionDenied):  # and the operator holds no hospital right
        console_authorize("Olu", frozenset({"operator"}), "console.read", CONSOLE_RULES)
    assert parse_role_map("ops=operator", "V", CENTRAL_CONSOLE_ROLES) == {"ops": "operator"}
    with pytest.raises(ConfigError):
        parse_role_map("ops=steward", "V", CENTRAL_CONSOLE_ROLES)


def test_sessions_expire_when_idle_and_after_their_longest_life() -> None:
    now = [0.0]
    store = SessionStore(idle_seconds=60, max_seconds=300, clock=lambda: now[0])
    person = SignedIn("s", "Dana", frozenset({"steward"}), ())
    s = store.create(person)
    for _ in range(4):  # kept alive by use...
        now[0] += 59
        assert store.get(s.id) is s
    now[0] += 61  # ...idle too long
    assert store.get(s.id) is None
    s = store.create(person)
    for _ in range(5):  # used every 55 s...
        now[0] += 55
        assert store.get(s.id) is s
    now[0] += 55  # ...but 330 s after sign-in it ends
    assert store.get(s.id) is None
    assert not store.create(person).csrf_matches("") and store.get("made-up") is None


CONSOLE_ENV = {
    "FIBEMRSS_CONSOLE_LISTEN": "0.0.0.0:8443",
    "FIBEMRSS_CONSOLE_TLS_CERT": "/certs/console.crt",
    "FIBEMRSS_CONSOLE_TLS_KEY": "/certs/console.key",
    "FIBEMRSS_OIDC_ISSUER": ISSUER,
    "FIBEMRSS_OIDC_CLIENT_ID": CLIENT,
    "FIBEMRSS_OIDC_ROLES": "stewards=steward,auditors=auditor",
}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"FIBEMRSS_CONSOLE_TLS_CERT": ""}, "FIBEMRSS_CONSOLE_TLS_CERT"),
        ({"FIBEMRSS_CONSOLE_TLS_KEY": ""}, "FIBEMRSS_CONSOLE_TLS_KEY"),
        ({"FIBEMRSS_OIDC_ISSUER": ""}, "FIBEMRSS_OIDC_ISSUER"),
        ({"FIBEMRSS_OIDC_ISSUER": "http://idp.h1.example"}, "FIBEMRSS_OIDC_ISSUER"),
        ({"FIBEMRSS_OIDC_CLIENT_ID": ""}, "FIBEMRSS_OIDC_CLIENT_ID"),
        ({"FIBEMRSS_OIDC_CLIENT_SECRET_FILE": "/nonexistent/secret"}, "FIBEMRSS_OIDC_CLIENT_SECRET_FILE"),
        ({"FIBEMRSS_OIDC_ROLES": ""}, "FIBEMRSS_OIDC_ROLES"),
        ({"FIBEMRSS_OIDC_ROLES": "everyone=admin"}, "FIBEMRSS_OIDC_ROLES"),
        (
            {"FIBEMRSS_CONSOLE_LISTEN": "", "FIBEMRSS_CONSOLE_PLAINTEXT_LISTEN": "0.0.0.0:8080"},
            "FIBEMRSS_CONSOLE_PLAINTEXT_LISTEN",
        ),
        ({"FIBEMRSS_CONSOLE_URL": "http://console.h1.example"}, "FIBEMRSS_CONSOLE_URL"),
    ],
)
def test_the_console_refuses_to_start_without_tls_or_sign_in_settings_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, change: dict[str, str], named: str
) -> None:
    from fibemrss.platform.console_config import console_from_env

    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    env = {**CONSOLE_ENV, "FIBEMRSS_OIDC_CLIENT_SECRET_FILE": str(secret), **change}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=named):
        console_from_env()


def test_the_console_is_off_unless_asked_and_reads_its_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from fibemrss.platform.console_config import console_from_env

    assert console_from_env() is None
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    for k, v in {**CONSOLE_ENV, "FIBEMRSS_OIDC_CLIENT_SECRET_FILE": str(secret)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FIBEMRSS_CONSOLE_URL", "https://console.h1.example")
    config = console_from_env()
    assert config is not None and config.listen.tls is not None
    assert config.oidc.client_secret == "s3cret"
    assert config.oidc.roles_by_group == {"stewards": "steward", "auditors": "auditor"}
    assert config.redirect_uri("https://10.0.0.5:8443") == "https://console.h1.example/oidc/callback"
