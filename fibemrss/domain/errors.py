"""Domain errors shared by every service; `grpc_status_mapping` turns them into status codes.

Handlers raise these; they never build gRPC statuses themselves. Messages must not contain
patient data: they end up in client-visible status details and in logs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldProblem:
    """One bad field of a request: its path (as a client would name it) and why."""

    field: str
    description: str


class DomainError(Exception):
    """Base of all errors a handler may raise on purpose."""


class InvalidArgument(DomainError):
    def __init__(self, message: str, violations: list[FieldProblem] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or []


class NotFound(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class Unauthenticated(DomainError):
    pass


class ResourceExhausted(DomainError):
    """The caller holds more than its share of a server (calls, streams); it may retry later."""


class Unavailable(DomainError):
    """A dependency (database, peer service) is down; the caller may retry."""


class ConfigError(Exception):
    """Start-up configuration is missing or wrong; the process stops with this message."""
