"""Rollout supervision: whether a candidate version is good, bad, or not known yet.

A version activated by a channel update (or ``pull --candidate``) is a *candidate*:
it is on probation until apps' reports of their loads, or the admin, say it is good.
"Happiness" is the share of failed loads. The candidate's share over its probation
window (``rollout.window`` seconds from its activation) is compared with the
last-good version's share over a window of the same length just before it::

    reports of the candidate (N = rollout.good_loads, T = rollout.max_failure_increase)
    fewer than N                          wait     (too few to judge either way)
    share - baseline share > T            rollback (to last-good; "unhappy" when there is none)
    at least N successful                 good     (probation ends)
    otherwise                             wait     (enough reports, not enough successes)

A baseline with no reports counts as a share of 0: nothing showed that last-good
failed. Reports after the window count for nothing: a candidate whose window ended
undecided stays one until ``modelfs mark-good`` or ``modelfs rollback``.

A plan only: pure logic on counts the caller read. ``Store.supervise`` reads them
from the catalog and carries the verdict out; this module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["wait", "good", "rollback", "unhappy"]

#: What the rollback and the "good" mark are recorded as doing (audit actor).
SUPERVISOR = "supervisor"


@dataclass(frozen=True)
class Rules:
    """The settings the verdict depends on (``rollout.*``)."""
    good_loads: int = 3                 # successful loads that end a probation (and reports needed to judge)
    max_failure_increase: float = 0.2   # how much worse than last-good the failed share may be
    window: float = 3600.0              # seconds of probation, and of the baseline before it


@dataclass(frozen=True)
class Tally:
    ok: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.ok + self.failed

    @property
    def failed_share(self) -> float:
        return self.failed / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ok_count": self.ok, "failed_count": self.failed, "failed_share": round(self.failed_share, 4)}


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    candidate: Tally
    baseline: Tally

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reason": self.reason, "candidate": self.candidate.as_dict(),
                "baseline": self.baseline.as_dict()}


def windows(since: float, rules: Rules) -> tuple[tuple[float, float], tuple[float, float]]:
    """The candidate's probation window and the baseline's window of the same length before it."""
    return (since, since + rules.window), (since - rules.window, since)


def decide(candidate: Tally, baseline: Tally, rules: Rules, *, has_last_good: bool,
           window_over: bool = False) -> Decision:
    """The verdict on a candidate from its reports and last-good's (see the module docstring)."""
    def verdict(v: Verdict, reason: str) -> Decision:
        return Decision(v, reason, candidate, baseline)

    share, base = candidate.failed_share, baseline.failed_share
    if candidate.total < rules.good_loads:
        more = rules.good_loads - candidate.total
        if window_over:
            return verdict("wait", f"its probation window ended with {candidate.total} of {rules.good_loads} "
                                   "reports: `modelfs mark-good` or `modelfs rollback` decides")
        return verdict("wait", f"{candidate.total} of {rules.good_loads} reports so far ({more} more to judge)")
    if share - base > rules.max_failure_increase:
        why = (f"{candidate.failed} of {candidate.total} loads failed ({share:.0%}), against {base:.0%} for "
               f"last-good over the same time before it; more than {rules.max_failure_increase:.0%} worse")
        return verdict("rollback" if has_last_good else "unhappy",
                       why if has_last_good else why + ", and there is no last-good version to go back to")
    if candidate.ok >= rules.good_loads:
        return verdict("good", f"{candidate.ok} successful loads of {candidate.total} ({share:.0%} failed, "
                               f"last-good {base:.0%})")
    if window_over:
        return verdict("wait", f"its probation window ended with {candidate.ok} of {rules.good_loads} successful "
                               "loads: `modelfs mark-good` or `modelfs rollback` decides")
    return verdict("wait", f"{candidate.ok} of {rules.good_loads} successful loads so far")
