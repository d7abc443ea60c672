"""The backbone: one wrapper over a diffusers editing pipeline, and the embedded tiny default."""
