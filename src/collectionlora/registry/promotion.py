"""Who may hold the `champion` alias: a version whose gate passed and that beats the current champion
on the gate metric (judge accuracy at 8 NFE, ties broken by the lower BCR). Pure functions: the
registry applies them, tests exercise every branch without a server."""

from __future__ import annotations

from dataclasses import dataclass

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class Score:
    """A version's gate result and gate metric, as recorded in its tags."""

    gate_passed: bool
    judge_accuracy: float
    bcr: float


@dataclass(frozen=True)
class ChampionDecision:
    move: bool
    reason: str  # one line, printed by the command


def beats(candidate: Score, champion: Score) -> bool:
    """A passing gate beats a failed one (a champion forced in by hand); then higher judge accuracy
    wins; an exact tie goes to the lower BCR; a full tie keeps the champion."""
    if candidate.gate_passed != champion.gate_passed:
        return candidate.gate_passed
    if candidate.judge_accuracy != champion.judge_accuracy:
        return candidate.judge_accuracy > champion.judge_accuracy
    return candidate.bcr < champion.bcr


def decide_champion(version: str, candidate: Score, champion_version: str | None, champion: Score | None) -> ChampionDecision:
    """Whether `champion` moves to `version`, with the reason in one line."""
    mine = f"judge accuracy {candidate.judge_accuracy:.3f}, BCR {candidate.bcr:.3f}"
    if not candidate.gate_passed:
        return ChampionDecision(False, f"champion stays at {_holder(champion_version)}: version {version}'s gate failed")
    if champion_version is None or champion is None:
        return ChampionDecision(True, f"champion -> version {version} (first to pass the gate; {mine})")
    if champion_version == version:
        return ChampionDecision(False, f"version {version} is the champion already")
    theirs = f"judge accuracy {champion.judge_accuracy:.3f}, BCR {champion.bcr:.3f}"
    if beats(candidate, champion):
        return ChampionDecision(True, f"champion -> version {version} ({mine}) from version {champion_version} ({theirs})")
    return ChampionDecision(False, f"champion stays at version {champion_version} ({theirs}): version {version} does not beat it ({mine})")


def _holder(version: str | None) -> str:
    return f"version {version}" if version is not None else "no version"
