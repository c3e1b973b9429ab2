"""The checker's result type and the small helpers its checks share."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Verdict = Literal["pass", "fail", "inconclusive"]
MAX_EVIDENCE = 25  # items of evidence kept per check; the counts say how many there were


class CheckResult(BaseModel):
    """One invariant's verdict, its counts, and evidence for each violation (the first MAX_EVIDENCE)."""

    name: str
    verdict: Verdict
    what: str = Field(description="The invariant, in one sentence.")
    counts: dict[str, Any] = Field(default_factory=dict)
    evidence: list[dict[str, Any]] = Field(default_factory=list)
    note: str | None = None


def result(
    name: str, what: str, counts: dict[str, Any], evidence: list[dict[str, Any]], failed: bool, note: str | None = None
) -> CheckResult:
    return CheckResult(
        name=name,
        verdict="fail" if failed else "pass",
        what=what,
        counts=counts,
        evidence=evidence[:MAX_EVIDENCE],
        note=note,
    )


def epoch(iso: str | None) -> float | None:
    """A job record's ISO 8601 timestamp as Unix seconds (None when absent or unreadable)."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def p99(values: list[float]) -> float | None:
    from serve.bench import percentile

    return percentile(values, 99.0)
