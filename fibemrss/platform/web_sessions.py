"""Server-side sessions of the web consoles: the browser holds only a random id (an HttpOnly
cookie); who signed in, their roles and their CSRF token stay in the console's memory and expire.

A session ends after `idle_seconds` without a request or `max_seconds` after sign-in, whichever
comes first; a restart signs everyone out (people sign in again through the provider, which
usually still knows them). Each session has its own CSRF token, which every form carries and every
POST must present (compared in constant time). The clock is a parameter, so a test expires a
session by advancing it instead of waiting.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fibemrss.platform.oidc import SignedIn

DEFAULT_IDLE_SECONDS = 30 * 60.0
DEFAULT_MAX_SECONDS = 8 * 3600.0
MAX_SESSIONS = 10_000  # sessions held at once; the oldest sign-in goes first


@dataclass
class WebSession:
    id: str
    person: SignedIn
    csrf: str
    started: float
    seen: float
    flash: str = ""  # a message for the next page (after a form's redirect)

    def csrf_matches(self, presented: str) -> bool:
        return hmac.compare_digest(self.csrf.encode(), presented.encode())


class SessionStore:
    def __init__(
        self,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.clock = clock
        self._sessions: dict[str, WebSession] = {}
        self._lock = threading.Lock()

    def create(self, person: SignedIn) -> WebSession:
        now = self.clock()
        session = WebSession(secrets.token_urlsafe(32), person, secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._drop_expired(now)
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> WebSession | None:
        """The live session of this id (its idle time restarts), or None: unknown or expired."""
        now = self.clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[session_id]
                return None
            session.seen = now
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _expired(self, s: WebSession, now: float) -> bool:
        return now - s.seen > self.idle_seconds or now - s.started > self.max_seconds

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[key]
