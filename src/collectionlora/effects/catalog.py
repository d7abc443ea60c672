"""The procedural effect catalog: ground-truth edits for the embedded demo and the effect judge."""

from __future__ import annotations

import re
from functools import cache

from collectionlora.effects import colour, overlay, spatial, texture
from collectionlora.effects.base import Effect

__all__ = ["Effect", "catalog", "catalog_records", "get_effect"]

ID_PATTERN = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@cache
def _effects() -> tuple[Effect, ...]:
    effects = colour.EFFECTS + spatial.EFFECTS + texture.EFFECTS + overlay.EFFECTS
    for field in ("id", "prompt"):
        values = [getattr(e, field) for e in effects]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise RuntimeError(f"effect catalog: duplicate {field}s {duplicates}")
    bad = [e.id for e in effects if not ID_PATTERN.match(e.id)]
    if bad:
        raise RuntimeError(f"effect catalog: ids must be snake_case, got {bad}")
    return effects


def catalog() -> dict[str, Effect]:
    """Every catalog effect by id, in a stable order (grouped by module, as written)."""
    return {effect.id: effect for effect in _effects()}


def get_effect(effect_id: str) -> Effect:
    effects = catalog()
    if effect_id not in effects:
        known = len(effects)
        raise ValueError(f"unknown effect {effect_id!r}: `collectionlora effects list` shows the {known} known ids")
    return effects[effect_id]


def catalog_records() -> list[dict]:
    """One JSON-ready record per effect, for `collectionlora effects list --json`."""
    return [
        {"id": e.id, "category": e.category, "stochastic": e.stochastic, "prompt": e.prompt} for e in _effects()
    ]
