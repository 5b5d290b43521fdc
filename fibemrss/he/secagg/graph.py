"""Who holds whose shares and masks with whom: the cohort's neighbour graph and its threshold.

Small cohorts (up to FULL_GRAPH_MAX members) use the complete graph of Bonawitz et al. (CCS
2017): every member masks with every other and shares its secrets with all of them. Larger
cohorts use the sparse graph of SecAgg+ (Bell et al., CCS 2020): a Harary graph of even degree
k = 2 * ceil(DEGREE_FACTOR * log2(n) / 2) over the members in a pseudo-random order that
nobody chooses alone (the order is a hash of the signed key advertisements of the whole cohort),
so each member's work and messages grow as log n and the whole round's as n log n.

A member's secrets are shared among its holders (its neighbours and itself) with threshold
t = floor(2 h / 3) + 1 for h holders (`threshold`). The complete graph's h is the roster (the
sites the study lists) when the study lists them, so an aggregator that shows a hospital a
small cohort cannot lower the threshold. docs/he-codec.md ("Secure aggregation") argues both.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

FULL_GRAPH_MAX = 32
DEGREE_FACTOR = 3.0


def threshold(holders: int) -> int:
    """Shares needed to recover a secret held by `holders` parties: more than two thirds."""
    return (2 * holders) // 3 + 1


def degree(n: int) -> int:
    """Neighbours per member in a cohort of n (n - 1: the complete graph)."""
    if n <= FULL_GRAPH_MAX:
        return n - 1
    k = 2 * math.ceil(DEGREE_FACTOR * math.log2(n) / 2)
    return min(k, n - 1)


def neighbours(cohort: Sequence[str], seed: bytes) -> dict[str, frozenset[str]]:
    """Each member's neighbours (never itself): complete up to FULL_GRAPH_MAX, else a Harary
    graph H(k, n) over the members ordered by SHA-256(seed, name)."""
    members = sorted(set(cohort))
    n = len(members)
    if n <= FULL_GRAPH_MAX:
        return {m: frozenset(members) - {m} for m in members}
    order = sorted(members, key=lambda m: hashlib.sha256(seed + m.encode()).digest())
    half = degree(n) // 2
    graph: dict[str, set[str]] = {m: set() for m in members}
    for i, m in enumerate(order):
        for step in range(1, half + 1):
            peer = order[(i + step) % n]
            graph[m].add(peer)
            graph[peer].add(m)
    return {m: frozenset(p) for m, p in graph.items()}


def holder_index(cohort: Iterable[str]) -> dict[str, int]:
    """Each member's Shamir x coordinate: its position (from 1) in the sorted cohort."""
    return {m: i + 1 for i, m in enumerate(sorted(set(cohort)))}


def member_threshold(member: str, graph: Mapping[str, frozenset[str]], roster_size: int | None) -> int:
    """The threshold of `member`'s shares: over its holders (neighbours and itself), or over the
    roster for the complete graph when the study lists its sites."""
    holders = len(graph[member]) + 1
    if roster_size is not None and len(graph) <= FULL_GRAPH_MAX:
        return threshold(max(roster_size, holders))
    return threshold(holders)
