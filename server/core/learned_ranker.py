"""The learned ranker a model version may carry: a LightGBM LambdaRank model over features.FEATURE_NAMES."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from chronorec.server.core.features import FEATURE_INDEX, FEATURE_NAMES

RANKER_FILE = "ranker.txt"
RANKER_KIND = "lightgbm-lambdarank"
# Candidates the ranker rescores by default: the blend's best, the rest keep the blend's order below.
DEFAULT_CANDIDATES = 200
# Beyond the blend's best, the learned ranker also rescores this many items from each of two
# whole-history sources (co-occurrence with every history item alike, and the items nearest the
# mean of the history's vectors). The blend decays the history: for a user back after weeks away
# it has faded to what is popular now, and the items of their standing taste would be out of the
# ranker's reach, whatever it learned about such users.
DEFAULT_SECOND_LOOK = 50
MAX_CANDIDATES = 5000
# Reasons name this many features per recommended item.
FEATURE_REASONS = 3


class RankerError(ValueError):
    """A version's learned ranker that cannot serve (missing, unreadable, unknown features, bad output)."""


@dataclass(frozen=True)
class GapRoute:
    """Users whose time since their previous event lies in [min_gap_s, max_gap_s) are ranked by one
    feature (highest first, the learned score breaking ties) instead of the learned score.

    The training pipeline adds one where, on the validation window, that feature alone ranked such
    users' next item better than the trees did by an interval above zero, or, for users back after a
    week or more, where a trend window simply did better: such users are 1-2 % of the events the
    trees learn from, and what is popular this month can serve them better than what the trees made
    of so few."""

    min_gap_s: float
    max_gap_s: float  # math.inf: no upper bound
    feature: str

    def covers(self, gap_log_s: np.ndarray) -> np.ndarray:
        """Whether each user_gap_log_s value (log1p of the seconds) falls in the route's range."""
        return (gap_log_s >= math.log1p(self.min_gap_s)) & (gap_log_s < math.log1p(self.max_gap_s))

    def to_dict(self) -> dict[str, Any]:
        return {"min_gap_s": self.min_gap_s, "max_gap_s": None if math.isinf(self.max_gap_s) else self.max_gap_s,
                "feature": self.feature}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GapRoute":
        top = data.get("max_gap_s")
        return cls(float(data["min_gap_s"]), math.inf if top is None else float(top), str(data["feature"]))


@dataclass(frozen=True)
class RankerSpec:
    """The manifest's `ranker` entry: which file, which features in which order, how many candidates."""

    file: str = RANKER_FILE
    features: tuple[str, ...] = FEATURE_NAMES
    candidates: int = DEFAULT_CANDIDATES
    kind: str = RANKER_KIND
    # Items from each whole-history source also rescored (ranking.TimeAwareRanker.second_look);
    # 0 in a version whose manifest predates it, which then serves as it was trained.
    second_look: int = DEFAULT_SECOND_LOOK
    # Ranges of time since the user's previous event ranked by one feature (GapRoute); none in a
    # version whose manifest predates them.
    routes: tuple[GapRoute, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "features": list(self.features), "candidates": self.candidates,
                "second_look": self.second_look, "routes": [r.to_dict() for r in self.routes], "kind": self.kind}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankerSpec":
        """The entry as the manifest schema validated it (see manifest._optional_ranker)."""
        return cls(file=data["file"], features=tuple(data["features"]), candidates=int(data["candidates"]),
                   kind=data.get("kind", RANKER_KIND), second_look=int(data.get("second_look", 0)),
                   routes=tuple(GapRoute.from_dict(r) for r in data.get("routes", ())))


@dataclass(frozen=True)
class FeatureReason:
    """A feature that moved a recommended item's learned score, and by how much (log-odds-like units)."""

    name: str
    contribution: float


class LearnedRanker:
    """Scores the blend's top candidates from their point-in-time features.

    LightGBM predicts thread-safely, so one instance serves every request of its version.
    """

    def __init__(self, booster, spec: RankerSpec, threads: int = 1):
        unknown = [name for name in spec.features if name not in FEATURE_INDEX]
        unknown += [route.feature for route in spec.routes if route.feature not in FEATURE_INDEX]
        if unknown:
            raise RankerError(f"the ranker reads features this server does not compute: {', '.join(unknown[:5])}")
        if booster.num_feature() != len(spec.features):
            raise RankerError(f"the ranker reads {booster.num_feature()} features, its manifest names "
                              f"{len(spec.features)}")
        self.booster = booster
        self.spec = spec
        self.columns = np.array([FEATURE_INDEX[name] for name in spec.features], dtype=np.int64)
        # One thread per request: the rows are few, and OpenMP workers would spin against the server's threads.
        self.threads = threads

    @property
    def candidates(self) -> int:
        return self.spec.candidates

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.spec.features

    @classmethod
    def from_model_text(cls, text: str, spec: RankerSpec, threads: int = 1) -> "LearnedRanker":
        import lightgbm

        try:
            booster = lightgbm.Booster(model_str=text)
        except Exception as exc:  # LightGBM reports a corrupt model as its own error type
            raise RankerError(f"the ranker file is not a LightGBM model: {_first_line(exc)}") from None
        return cls(booster, spec, threads)

    @classmethod
    def load(cls, version_dir: str | os.PathLike, spec: RankerSpec, threads: int = 1) -> "LearnedRanker":
        """Load and check the version's ranker; RankerError says why it cannot serve."""
        folder = Path(version_dir)
        path = folder / spec.file
        try:
            inside = path.resolve().parent == folder.resolve()
        except OSError:
            inside = False
        if not inside:
            raise RankerError(f"{spec.file} links outside the version folder")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RankerError(f"the ranker file {spec.file} is missing") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RankerError(f"the ranker file {spec.file} cannot be read: {type(exc).__name__}") from None
        ranker = cls.from_model_text(text, spec, threads)
        ranker.check()
        return ranker

    def model_text(self) -> str:
        return self.booster.model_to_string()

    def check(self) -> None:
        """Predict on rows of typical and missing values: finite scores, or RankerError."""
        rows = np.zeros((3, len(FEATURE_NAMES)), dtype=np.float32)
        rows[1] = 1.0
        rows[2] = np.nan
        scores = self.predict(rows)
        if scores.shape != (3,) or not np.isfinite(scores).all():
            raise RankerError("the ranker gives no finite score on a check row")

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Scores of rows of all FEATURE_NAMES (features.candidate_features), higher is better; rows
        of a user in a routed gap range (spec.routes) are ordered by the route's feature."""
        if not len(features):
            return np.zeros(0, dtype=np.float64)
        data = np.ascontiguousarray(features[:, self.columns], dtype=np.float64)
        scores = np.asarray(self.booster.predict(data, num_threads=self.threads), dtype=np.float64)
        if not self.spec.routes:
            return scores
        routed = self.routed_feature(features)
        for feature in np.unique(routed[routed != ""]):
            rows = np.flatnonzero(routed == feature)
            scores[rows] = _ordered_by(features[rows, FEATURE_INDEX[str(feature)]], scores[rows])
        return scores

    def routed_feature(self, features: np.ndarray) -> np.ndarray:
        """Per row, the feature its gap route ranks by ("" where the learned score ranks)."""
        out = np.full(len(features), "", dtype=object)
        gaps = features[:, FEATURE_INDEX["user_gap_log_s"]]
        for route in self.spec.routes:
            out[route.covers(gaps) & (out == "")] = route.feature
        return out

    def contributions(self, features: np.ndarray, threads: int | None = None) -> np.ndarray:
        """(rows, ranker features) each feature's additive part of the score (SHAP values); `threads`:
        LightGBM's threads for this call (default: the ranker's own, one per request)."""
        if not len(features):
            return np.zeros((0, len(self.columns)), dtype=np.float64)
        data = np.ascontiguousarray(features[:, self.columns], dtype=np.float64)
        values = np.asarray(self.booster.predict(data, pred_contrib=True, num_threads=threads or self.threads))
        return values[:, : len(self.columns)]  # the last column is the expected value

    def reasons(self, features: np.ndarray, top: int = FEATURE_REASONS) -> list[list[FeatureReason]]:
        """Per row, the features that moved its score most (largest |contribution| first); a routed
        row's first reason is the route's feature (its value), the trees' tie-breakers follow."""
        contributions = self.contributions(features)
        routed = self.routed_feature(features) if self.spec.routes else np.full(len(features), "", dtype=object)
        out = []
        for k, row in enumerate(contributions):
            order = np.argsort(-np.abs(row), kind="stable")[:top]
            reasons = [FeatureReason(self.spec.features[i], float(row[i])) for i in order
                       if row[i] != 0 and math.isfinite(row[i])]
            if routed[k]:
                value = float(features[k, FEATURE_INDEX[routed[k]]])
                reasons = [FeatureReason(routed[k], value if math.isfinite(value) else 0.0)] + [
                    r for r in reasons if r.name != routed[k]][: top - 1]
            out.append(reasons)
        return out

    def importances(self) -> dict[str, float]:
        """Total gain per feature (what the trees split on most), normalised to sum 1."""
        gains = np.asarray(self.booster.feature_importance(importance_type="gain"), dtype=np.float64)
        total = float(gains.sum())
        return {name: float(g / total) if total > 0 else 0.0 for name, g in zip(self.spec.features, gains)}


def load_version_ranker(version_dir: str | os.PathLike, manifest) -> LearnedRanker | None:
    """The learned ranker a version's manifest names, loaded and checked; None when it names none."""
    if manifest.ranker is None:
        return None
    return LearnedRanker.load(version_dir, RankerSpec.from_dict(manifest.ranker))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _ordered_by(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Scores that order rows by `primary` (highest first, missing last), ties by `secondary`: each
    row's rank counted up from the lowest secondary score."""
    primary = np.where(np.isfinite(primary), primary, -np.inf)
    order = np.lexsort((secondary, primary))  # ascending: the best last
    ranks = np.empty(len(order), dtype=np.float64)
    ranks[order] = np.arange(len(order), dtype=np.float64)
    low = float(np.min(secondary)) if len(secondary) else 0.0
    return low + ranks


def select_columns(features: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The columns `names` of a full FEATURE_NAMES matrix."""
    return features[:, [FEATURE_INDEX[name] for name in names]]


__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_SECOND_LOOK",
    "FEATURE_REASONS",
    "FeatureReason",
    "GapRoute",
    "LearnedRanker",
    "MAX_CANDIDATES",
    "RANKER_FILE",
    "RANKER_KIND",
    "RankerError",
    "RankerSpec",
    "load_version_ranker",
    "select_columns",
]
