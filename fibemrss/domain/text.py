"""Text that PostgreSQL and clients can store: no NUL character, no lone surrogate (JSON allows
both, and a protobuf string from Python may carry either)."""

from __future__ import annotations

from fibemrss.domain.errors import FieldProblem


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored, or None."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    return None


def text_problems(fields: dict[str, str]) -> list[FieldProblem]:
    """One problem per named field whose text cannot be stored."""
    return [FieldProblem(name, why) for name, text in fields.items() if text and (why := text_problem(text))]
