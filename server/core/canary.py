"""Canary traffic: which users a candidate version serves, the plan kept in the model repository, and the promote/abort rule."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from chronorec.server.core.errors import ChronorecError, FailedPrecondition, InvalidArgument
from chronorec.server.core.online_metrics import Figures, OnlineMetrics
from chronorec.server.core.repository import ModelRepository

if TYPE_CHECKING:
    from chronorec.server.core.model_lifecycle import ModelManager

log = logging.getLogger("chronorec.canary")


@dataclass(frozen=True)
class CanaryPolicy:
    """When a canary decides by itself: after both versions logged `min_impressions` impressions
    since it began, promote when the candidate's CTR >= the current's - `max_ctr_drop`, else abort.
    `min_impressions` 0: no automatic decision."""

    min_impressions: int = 0
    max_ctr_drop: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.min_impressions, bool) or not isinstance(self.min_impressions, int) or self.min_impressions < 0:
            raise InvalidArgument(f"canary min_impressions must be a whole number >= 0, got {self.min_impressions!r}")
        if not isinstance(self.max_ctr_drop, (int, float)) or not math.isfinite(self.max_ctr_drop) or not 0 <= self.max_ctr_drop <= 1:
            raise InvalidArgument(f"canary max_ctr_drop must be a CTR difference in [0, 1], got {self.max_ctr_drop!r}")

    @property
    def automatic(self) -> bool:
        return self.min_impressions > 0


def check_percent(percent: float) -> float:
    """`percent` as a float in [0, 100]; InvalidArgument otherwise."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not math.isfinite(percent) or not 0 <= percent <= 100:
        raise InvalidArgument(f"canary percentage must be between 0 and 100, got {percent!r}")
    return float(percent)


@dataclass(frozen=True)
class CanaryPlan:
    """A canary as the repository records it (`<models>/encoder/CANARY`): every replica sharing
    the repository serves the same split, and a restarted server resumes it."""

    candidate: str
    percent: float
    started_at: float = field(default_factory=time.time)
    policy: CanaryPolicy = field(default_factory=CanaryPolicy)

    def __post_init__(self) -> None:
        check_percent(self.percent)

    def serves(self, user_id: str | None) -> bool:
        """Whether the candidate serves `user_id`. A stable hash, salted with the candidate's
        name: a user stays on one side for the whole canary, and each canary picks its own users
        (the same few are not every candidate's first users). Anonymous requests stay on the
        current version."""
        return bool(user_id) and user_bucket(self.candidate, user_id) < self.percent

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CanaryPlan":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a canary plan is a JSON object")
        policy = data.get("policy") or {}
        return cls(
            candidate=str(data["candidate"]),
            percent=float(data["percent"]),
            started_at=float(data["started_at"]),
            policy=CanaryPolicy(int(policy.get("min_impressions", 0)), float(policy.get("max_ctr_drop", 0.0))),
        )


def read_plan(repository: ModelRepository) -> CanaryPlan | None:
    """The canary the repository records, or None (none, or a file that does not parse: logged)."""
    text = repository.read_canary()
    if text is None:
        return None
    try:
        return CanaryPlan.from_json(text)
    except (ValueError, KeyError, TypeError, ChronorecError) as exc:
        log.error("ignoring the canary plan in %s: %s", repository.encoder_dir, exc)
        return None


def write_plan(repository: ModelRepository, plan: CanaryPlan) -> None:
    """Record `plan`: every server on this repository starts serving it within its watch interval."""
    repository.write_canary(plan.to_json())


def user_bucket(candidate: str, user_id: str) -> float:
    """A user's place in [0, 100) for a canary of `candidate` (uniform over users)."""
    digest = hashlib.blake2b(f"{candidate}\x00{user_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


@dataclass(frozen=True)
class Decision:
    """What the rule says: "wait", "promote" or "abort", and why (with the figures)."""

    action: str
    reason: str


def judge(policy: CanaryPolicy, candidate: Figures, current: Figures) -> Decision:
    """The promote/abort rule on the two versions' figures since the canary began."""
    if not policy.automatic:
        return Decision("wait", "no automatic rule: promote or abort by hand")
    short = [
        f"{name} has {figures.impressions} of {policy.min_impressions} impressions"
        for name, figures in (("candidate", candidate), ("current", current))
        if figures.impressions < policy.min_impressions
    ]
    if short:
        return Decision("wait", "; ".join(short))
    figures = (f"candidate CTR {candidate.ctr:.4f} ({candidate.clicks}/{candidate.impressions}), current CTR "
               f"{current.ctr:.4f} ({current.clicks}/{current.impressions}), max drop {policy.max_ctr_drop:g}")
    if candidate.ctr >= current.ctr - policy.max_ctr_drop:
        return Decision("promote", figures)
    return Decision("abort", figures)


@dataclass(frozen=True)
class CanaryState:
    """A running canary as GetStatus reports it: the plan, both versions' figures since it began,
    and what the rule says now."""

    plan: CanaryPlan
    current_version: str
    candidate: Figures
    current: Figures
    decision: Decision


class CanaryJudge:
    """Applies a canary's rule: compares the growth of each version's attributed totals since the
    canary began and promotes or aborts once the rule decides. Each server judges its own traffic;
    over a shared repository, the first to decide moves the record and the others follow it."""

    def __init__(self, manager: "ModelManager", metrics: OnlineMetrics):
        self.manager = manager
        self.metrics = metrics
        # (candidate, started_at), current version, and the two versions' totals when it began.
        self._baseline: tuple[tuple[str, float], str, Figures, Figures] | None = None

    def started(self, plan: CanaryPlan, current_version: str | None) -> None:
        """The canary begins serving now: what each version has gathered so far does not count."""
        current = current_version or ""
        self._baseline = ((plan.candidate, plan.started_at), current, self.metrics.totals(plan.candidate),
                          self.metrics.totals(current))

    def state(self) -> CanaryState | None:
        plan, current = self.manager.canary_plan, self.manager.current_version() or ""
        if plan is None:
            return None
        baseline = self._baseline
        if baseline is None or baseline[0] != (plan.candidate, plan.started_at):
            self.started(plan, current)
            baseline = self._baseline
        elif baseline[1] != current:
            # The current version was swapped under the canary: compare with the new one from now.
            baseline = (baseline[0], current, baseline[2], self.metrics.totals(current))
            self._baseline = baseline
        seconds = max(0.0, time.time() - plan.started_at)
        candidate = replace(self.metrics.totals(plan.candidate) - baseline[2], seconds=seconds)
        current_figures = replace(self.metrics.totals(current) - baseline[3], seconds=seconds)
        return CanaryState(plan, current, candidate, current_figures, judge(plan.policy, candidate, current_figures))

    def tick(self) -> Decision | None:
        """Promote or abort when the rule decides; the decision taken, if any."""
        state = self.state()
        if state is None or state.decision.action == "wait":
            return None
        try:
            if state.decision.action == "promote":
                self.manager.promote_canary(f"rule: {state.decision.reason}")
            else:
                self.manager.abort_canary(f"rule: {state.decision.reason}")
        except FailedPrecondition as exc:
            log.info("canary rule says %s, not applied yet: %s", state.decision.action, exc.message)
            return None
        return state.decision


__all__ = ["CanaryJudge", "CanaryPlan", "CanaryPolicy", "CanaryState", "Decision", "check_percent", "judge", "read_plan",
           "user_bucket", "write_plan"]
