"""Procedural effects (ground-truth image edits) and procedural source images."""

from collectionlora.effects.catalog import Effect, catalog, catalog_records, get_effect
from collectionlora.effects.sources import SPLITS, make_sources

__all__ = ["SPLITS", "Effect", "catalog", "catalog_records", "get_effect", "make_sources"]
