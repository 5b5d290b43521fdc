"""The federation CA's revocation list (FIBEMRSS_TLS_CRL), enforced on every authenticated call.

A stolen certificate and its key pass mutual TLS until the certificate expires (a year,
fibemrss.tools.certs.VALIDITY). Once the CA lists it (`fibemrss certs revoke`), every service
given the list refuses it: gRPC calls (`UNAUTHENTICATED`, fibemrss.platform.interceptor), HTTPS
requests (401, fibemrss.platform.http_server), MLLP messages (`AR`), and signed protocol
messages (a mask key under a revoked certificate is refused by every hospital,
fibemrss.he.site_certificates.FederationCa). The check is per call, not per connection, so a
connection opened before the revocation is refused at its next call.

The file is re-read within `RECHECK_SECONDS` of a change (a mounted Secret or ConfigMap is
replaced in place), without a restart. Only a list the federation CA signed is taken, and never
one older (a smaller CRL number) than the one in force: replacing the file with an old list
cannot bring a revoked certificate back. An unreadable or foreign file at start-up stops the
service, naming the variable; later, it is logged and the list in force stays.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography import x509

from fibemrss.domain.errors import ConfigError
from fibemrss.he.errors import HeKeyError
from fibemrss.he.site_certificates import RevocationList


class TlsPaths(Protocol):
    """What the list needs of fibemrss.platform.config.TlsFiles (config builds the process's
    list as it reads the environment, so this module does not import it)."""

    @property
    def ca(self) -> str: ...

    @property
    def crl(self) -> str | None: ...

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0
LOG_EVERY_SECONDS = 60.0
# Certificates whose serial number is remembered by their PEM (a federation has a few hundred).
_MAX_CACHED_CERTIFICATES = 4096


class Revocations:
    """The list in force, and the file it came from (re-read when it changes)."""

    def __init__(
        self,
        crl_path: str,
        ca_path: str,
        recheck_seconds: float = RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(crl_path)
        self._ca_path = Path(ca_path)
        self._recheck = recheck_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._serials: OrderedDict[bytes, int] = OrderedDict()
        try:
            self._stamp = self._file_stamp()
            self._list = self._read()
        except (OSError, HeKeyError) as error:
            raise ConfigError(f"FIBEMRSS_TLS_CRL={crl_path}: {error}") from None
        self._checked = clock()
        self._warned_stale = False
        self._listeners: list[Callable[[str, int], None]] = []
        self._logged: dict[int, float] = {}  # serial -> when its last refusal was logged

    @property
    def number(self) -> int:
        return self._list.number

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self._path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> RevocationList:
        return RevocationList.from_pem(self._path.read_bytes(), self._ca_path.read_bytes())

    def _current(self) -> RevocationList:
        now = self._clock()
        if now - self._checked < self._recheck:
            return self._list
        with self._lock:
            if now - self._checked < self._recheck:
                return self._list
            self._checked = now
            try:
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    self._stamp = stamp
                    fresh = self._read()
                    if fresh.number < self._list.number:
                        log.error(
                            "revocation list ignored: older than the one in force",
                            extra={"file": str(self._path), "number": fresh.number, "in_force": self._list.number},
                        )
                    else:
                        if fresh.number != self._list.number:
                            log.info(
                                "revocation list updated",
                                extra={"number": fresh.number, "revoked": len(fresh.revoked)},
                            )
                        self._list = fresh
                        self._warned_stale = False
            except (OSError, HeKeyError) as error:
                log.error(
                    "revocation list not re-read; the one in force stays",
                    extra={"file": str(self._path), "reason": str(error)},
                )
            listed = self._list
            if (
                listed.next_update is not None
                and listed.next_update < datetime.datetime.now(datetime.UTC)
                and not self._warned_stale
            ):
                self._warned_stale = True
                log.warning(
                    "revocation list past its next update: still enforced; the CA should re-issue it "
                    "(fibemrss certs crl)",
                    extra={"file": str(self._path), "next_update": listed.next_update.isoformat()},
                )
            return listed

    def on_refusal(self, listener: Callable[[str, int], None]) -> None:
        """`listener(identity, serial)` runs at every refusal (the servers' counter
        `fibemrss_revoked_certificate_uses_total`, which the alert FibemrssRevokedCertificateInUse
        watches: a revoked certificate in use means its key is in someone's hands)."""
        self._listeners.append(listener)

    def refusal(self, serial: int, identity: str) -> str | None:
        """Why the certificate of `serial` (naming `identity`) is refused, or None."""
        when = self._current().revoked.get(serial)
        if when is None:
            return None
        for listener in self._listeners:
            listener(identity, serial)
        now = self._clock()
        if now - self._logged.get(serial, -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            self._logged[serial] = now  # once a minute per certificate: a thief may call in a loop
            log.warning(
                "revoked certificate in use: refused", extra={"identity": identity, "serial": f"{serial:x}"}
            )
        return (
            f"the certificate of {identity} (serial {serial:x}) was revoked by the federation CA "
            f"on {when:%Y-%m-%d %H:%M} UTC"
        )

    def refusal_for_pem(self, pem: bytes, identity: str) -> str | None:
        """As `refusal`, for a certificate as gRPC hands it over (PEM); its serial is remembered."""
        serial = self._serials.get(pem)
        if serial is None:
            try:
                serial = x509.load_pem_x509_certificate(pem).serial_number
            except ValueError:
                return f"the certificate of {identity} could not be read to check it against the revocation list"
            with self._lock:
                self._serials[pem] = serial
                if len(self._serials) > _MAX_CACHED_CERTIFICATES:
                    self._serials.popitem(last=False)
        return self.refusal(serial, identity)

    def refusal_for_hex(self, serial_hex: str | None, identity: str) -> str | None:
        """As `refusal`, for `ssl.SSLSocket.getpeercert()`'s "serialNumber" (hexadecimal)."""
        try:
            serial = int(serial_hex or "", 16)
        except ValueError:
            return f"the certificate of {identity} has no serial number to check against the revocation list"
        return self.refusal(serial, identity)


_by_file: dict[tuple[str, str], Revocations] = {}
_by_file_lock = threading.Lock()


def revocations_for(tls: TlsPaths | None) -> Revocations | None:
    """The process's one `Revocations` for `tls.crl` (None without a list), shared by the gRPC
    server, the HTTPS and MLLP edges and the signature checks of the same process."""
    if tls is None or not tls.crl:
        return None
    key = (tls.crl, tls.ca)
    with _by_file_lock:
        found = _by_file.get(key)
        if found is None:
            found = _by_file[key] = Revocations(tls.crl, tls.ca)
        return found


def revocation_check(tls: TlsPaths | None) -> Callable[[int, str], str | None] | None:
    """What the signature checks of this process ask about a certificate's serial (None: no list)."""
    revocations = revocations_for(tls)
    return None if revocations is None else revocations.refusal
