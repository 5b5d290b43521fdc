"""Errors raised by the homomorphic-encryption codec; callers map them to status codes in one place."""

from __future__ import annotations


class HeError(Exception):
    """Base class of every error the HE codec raises on purpose."""


class HeKeyError(HeError):
    """Key material is missing, malformed, of the wrong role, or from another key ceremony."""


class HeOverflowError(HeError):
    """A value, weight or party count lies outside the bounds that keep the encrypted sum exact."""


class HeFormatError(HeError):
    """A ciphertext chunk is malformed, or two chunks cannot be added (different layout or key)."""
