"""The backbone: one wrapper over a diffusers editing pipeline, and the embedded tiny default.

A plain diffusers script loads the embedded base with `load_pipeline(path)` and calls it inside
`condition_area(resolution**2)` (models/compat.py says why)."""

from collectionlora.models.compat import condition_area, load_pipeline

__all__ = ["condition_area", "load_pipeline"]
