"""Sign-in of people through the hospital's OpenID Connect provider: the authorization code flow
with PKCE, as the web consoles use it (Entra ID, Keycloak, Okta and npm's `oidc-provider` all
speak it).

Machines keep mutual TLS; people sign in here. The few steps of the flow are written out rather
than hidden in a framework, because each check is a security claim with its test
(tests/browser/test_console_browser.py, tests/integration/test_console_oidc.py):

- the request carries `state` (bound to a pending sign-in kept server-side, used once), a
  `nonce` and a PKCE S256 challenge; the code is exchanged with the verifier and the client secret;
- the id_token's signature is checked against the provider's published keys (JWKS), and its
  `iss`, `aud` (and `azp` when there are several audiences), `exp`, `iat` and `nonce`;
- the provider's group claim is mapped to console roles by configuration; a person whose groups
  map to no role is refused.

JOSE itself (JWS verification) is joserfc's; HTTP is httpx's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from fibemrss.domain.errors import ConfigError, PermissionDenied, Unauthenticated

PENDING_SECONDS = 600.0  # a sign-in started and not finished within this is forgotten
MAX_PENDING = 10_000  # pending sign-ins kept at once; the oldest go first
CLOCK_SKEW = 60  # seconds of clock difference with the provider tolerated on exp and iat
ALGORITHMS = ["RS256", "PS256", "ES256", "EdDSA"]


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str
    roles_by_group: Mapping[str, str]  # provider group -> console role
    groups_claim: str = "groups"
    scopes: str = "openid profile"
    ca_file: str | None = None  # a private CA for the provider's TLS (None: the system's)


@dataclass(frozen=True)
class SignedIn:
    """A person as the provider vouched for them."""

    subject: str
    name: str
    roles: frozenset[str]
    groups: tuple[str, ...]


@dataclass
class _Pending:
    nonce: str
    verifier: str
    next_path: str
    started: float
    browser: str  # the secret the browser that began the sign-in holds (a cookie)


def parse_role_map(text: str, variable: str, roles: frozenset[str]) -> dict[str, str]:
    """ "group=role,group=role" (a group may map to one role); ConfigError naming `variable`."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        group, eq, role = (s.strip() for s in part.partition("="))
        if not eq or not group or role not in roles:
            raise ConfigError(
                f"{variable}: {part!r} is not group=role with a role of {', '.join(sorted(roles))}"
            )
        out[group] = role
    if not out:
        raise ConfigError(f"{variable} maps no provider group to a console role")
    return out


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass
class OidcClient:
    settings: OidcSettings
    clock: Callable[[], float] = time.time
    _metadata: dict[str, Any] | None = None
    _keys: KeySet | None = None
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- provider metadata ---------------------------------------------------------------------------
    def _http(self) -> httpx.Client:
        verify = ssl.create_default_context(cafile=self.settings.ca_file) if self.settings.ca_file else True
        return httpx.Client(timeout=10.0, verify=verify)

    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document, read once; its issuer must be the configured one."""
        if self._metadata is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                with self._http() as http:
                    doc = http.get(url).raise_for_status().json()
            except (httpx.HTTPError, ValueError) as exc:
                raise Unauthenticated(
                    f"the sign-in provider cannot be reached ({type(exc).__name__})"
                ) from None
            if doc.get("issuer") != self.settings.issuer:
                raise Unauthenticated("the sign-in provider names another issuer than the configured one")
            self._metadata = doc
        return self._metadata

    def _key_set(self, refresh: bool = False) -> KeySet:
        if self._keys is None or refresh:
            try:
                with self._http() as http:
                    self._keys = KeySet.import_key_set(
                        http.get(self.metadata()["jwks_uri"]).raise_for_status().json()
                    )
            except (httpx.HTTPError, ValueError, KeyError, JoseError) as exc:
                raise Unauthenticated(
                    f"the provider's signing keys cannot be read ({type(exc).__name__})"
                ) from None
        return self._keys

    # -- the flow ------------------------------------------------------------------------------------
    def begin(self, next_path: str) -> tuple[str, str]:
        """The provider's authorization URL for a new sign-in that returns to `next_path`, and a
        secret for the browser that began it: the callback must present it, so an attacker's own
        authorization answer cannot sign a victim into the attacker's account (login CSRF)."""
        state, nonce, verifier, browser = (secrets.token_urlsafe(32) for _ in range(4))
        now = self.clock()
        with self._lock:
            for key in [k for k, p in self._pending.items() if now - p.started > PENDING_SECONDS]:
                del self._pending[key]
            while len(self._pending) >= MAX_PENDING:
                del self._pending[next(iter(self._pending))]
            self._pending[state] = _Pending(nonce, verifier, next_path, now, browser)
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.settings.client_id,
                "redirect_uri": self.settings.redirect_uri,
                "scope": self.settings.scopes,
                "state": state,
                "nonce": nonce,
                "code_challenge": s256(verifier),
                "code_challenge_method": "S256",
            }
        )
        return f"{self.metadata()['authorization_endpoint']}?{query}", browser

    def finish(self, state: str, code: str, iss: str | None, browser: str) -> tuple[SignedIn, str]:
        """The signed-in person and the path to return to; Unauthenticated for a state this
        console did not start (or already used, or too old) or that another browser started, an
        answer naming another issuer
        (RFC 9207, against mix-up), a refused code or a bad id_token; PermissionDenied for a
        person whose groups give no console role."""
        with self._lock:
            pending = self._pending.pop(state, None)
        if pending is None or self.clock() - pending.started > PENDING_SECONDS:
            raise Unauthenticated("this sign-in was not started here, was used already or is too old")
        if not hmac.compare_digest(pending.browser.encode(), browser.encode()):
            raise Unauthenticated("this sign-in was started by another browser")
        if iss is not None and iss != self.settings.issuer:
            raise Unauthenticated("the sign-in answer comes from another issuer than the configured one")
        if not code:
            raise Unauthenticated("the provider returned no authorization code")
        try:
            with self._http() as http:
                answer = http.post(
                    self.metadata()["token_endpoint"],
                    data={
                        "grant_type": "authorization_code",
                        "code": code,
                        "redirect_uri": self.settings.redirect_uri,
                        "code_verifier": pending.verifier,
                    },
                    auth=(self.settings.client_id, self.settings.client_secret),
                )
        except httpx.HTTPError as exc:
            raise Unauthenticated(f"the provider cannot be reached ({type(exc).__name__})") from None
        if answer.status_code != 200:
            raise Unauthenticated(f"the provider refused the authorization code (HTTP {answer.status_code})")
        try:
            id_token = str(answer.json()["id_token"])
        except (ValueError, KeyError, TypeError):
            raise Unauthenticated("the provider's token answer has no id_token") from None
        claims = self.verify_id_token(id_token, pending.nonce)
        return self.person(claims), pending.next_path

    def verify_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The id_token's claims once its signature, issuer, audience, expiry and nonce hold."""
        try:
            token = jwt.decode(id_token, self._key_set(), algorithms=ALGORITHMS)
        except JoseError:
            # A key rotated at the provider: read its keys again, once.
            try:
                token = jwt.decode(id_token, self._key_set(refresh=True), algorithms=ALGORITHMS)
            except (JoseError, ValueError) as exc:
                raise Unauthenticated(
                    f"the id_token's signature does not verify ({type(exc).__name__})"
                ) from None
        except ValueError as exc:
            raise Unauthenticated(f"the id_token is malformed ({type(exc).__name__})") from None
        claims = dict(token.claims)
        registry = jwt.JWTClaimsRegistry(
            now=int(self.clock()),
            leeway=CLOCK_SKEW,
            iss={"essential": True, "value": self.settings.issuer},
            aud={"essential": True, "value": self.settings.client_id},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise Unauthenticated(f"the id_token is not valid here: {exc.error}") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.settings.client_id:
            raise Unauthenticated("the id_token was issued to another client (azp)")
        return claims

    def person(self, claims: Mapping[str, Any]) -> SignedIn:
        raw = claims.get(self.settings.groups_claim, [])
        groups = tuple(str(g) for g in (raw if isinstance(raw, list) else [raw]))
        roles = frozenset(
            self.settings.roles_by_group[g] for g in groups if g in self.settings.roles_by_group
        )
        subject = str(claims["sub"])
        name = str(claims.get("name") or claims.get("preferred_username") or subject)
        if not roles:
            raise PermissionDenied(f"{name} has no console role: none of their groups is mapped to one")
        return SignedIn(subject, name[:200], roles, groups)
