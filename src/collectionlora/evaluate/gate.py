"""The promotion gate: whether a collection is good enough to replace its teachers, with every reason.

Checks (thresholds from `evaluate.gate`): the student's BCR is below each named alternative's (the
cascade a user would otherwise run, FM all-in-1, ...) and at most the teachers' + a margin; its judge
accuracy is within a tolerance of the teachers'; no effect's judge accuracy is below a floor. The gate
passes only when every check does; a registry promotes on `passed`, users read `checks`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from collectionlora.config import GateConfig


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    value: float
    threshold: float
    detail: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    student: str
    checks: tuple[GateCheck, ...]

    def to_json(self) -> dict:
        return {"passed": self.passed, "student": self.student, "checks": [asdict(c) for c in self.checks]}

    @property
    def reasons(self) -> list[str]:
        """The failed checks, one line each."""
        return [c.detail for c in self.checks if not c.passed]


def decide_gate(summaries: dict[str, dict[str, float]], per_effect: dict[str, dict[str, float]], config: GateConfig) -> GateDecision:
    """`summaries[method]` holds mean `bcr` and `judge_accuracy`; `per_effect[effect]` the gated
    student's `judge_accuracy` per effect."""
    student, teacher = summaries[config.student], summaries[config.teacher]
    checks = []
    for other in config.beat_bcr_of:
        value, bound = student["bcr"], summaries[other]["bcr"]
        checks.append(GateCheck(f"bcr_below_{other}", value < bound, value, bound, f"student BCR {value:.3f} < {other} BCR {bound:.3f}"))
    value, bound = student["bcr"], teacher["bcr"] + config.bcr_margin
    checks.append(
        GateCheck("bcr_near_teacher", value <= bound, value, bound, f"student BCR {value:.3f} <= {config.teacher} BCR + {config.bcr_margin} = {bound:.3f}")
    )
    value, bound = student["judge_accuracy"], teacher["judge_accuracy"] - config.accuracy_tolerance
    checks.append(
        GateCheck(
            "accuracy_near_teacher", value >= bound, value, bound,
            f"student judge accuracy {value:.3f} >= {config.teacher}'s - {config.accuracy_tolerance} = {bound:.3f}",
        )
    )
    worst = min(per_effect, key=lambda effect: per_effect[effect]["judge_accuracy"])
    value = per_effect[worst]["judge_accuracy"]
    checks.append(
        GateCheck("effect_floor", value >= config.effect_floor, value, config.effect_floor, f"lowest effect judge accuracy {value:.3f} ({worst}) >= {config.effect_floor}")
    )
    checks = tuple(_marked(c) for c in checks)
    return GateDecision(all(c.passed for c in checks), config.student, checks)


def _marked(check: GateCheck) -> GateCheck:
    """The detail says whether the inequality held: 'ok: ...' or 'FAILED: ...'."""
    return GateCheck(check.name, check.passed, check.value, check.threshold, ("ok: " if check.passed else "FAILED: ") + check.detail)
