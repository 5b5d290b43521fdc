"""The federated histograms an agent releases, as JSON and as one line per feature (demo, CLI)."""

from __future__ import annotations

import math
from typing import Any

from fibemrss.api.federation.v1 import federation_pb2 as fpb


def histograms_json(status: fpb.AgentStatus) -> list[dict[str, Any]]:
    """An agent's released federated histograms (bins of at least the task's minimum count); the
    open ends (-inf, +inf) are null, so the JSON stays standard."""

    def finite(v: float) -> float | None:
        return v if math.isfinite(v) else None

    return [
        {
            "feature": h.feature,
            "bins": [{"low": finite(b.low), "high": finite(b.high), "count": b.count} for b in h.bins],
            "suppressed_bins": h.suppressed_bins,
        }
        for h in status.histograms
    ]


def histogram_line(histogram: dict[str, Any]) -> str:
    """`age: <40 31 | 40-50 112 | >=50 777` (counts of patients; low-count bins merged)."""

    def edge(v: float) -> str:
        return f"{v:g}"

    parts = []
    for b in histogram["bins"]:
        low, high = b["low"], b["high"]
        where = (
            "all"
            if low is None and high is None
            else f"<{edge(high)}"
            if low is None
            else f">={edge(low)}"
            if high is None
            else f"{edge(low)}-{edge(high)}"
        )
        parts.append(f"{where} {b['count']}")
    return f"{histogram['feature']}: " + (" | ".join(parts) if parts else "withheld (too few patients)")
