"""The pipeline's components: one folder per stage, each a typed function whose body maps Kubeflow
artifacts to paths and calls the library (collectionlora.stages). `on_image` turns them into
lightweight KFP components on the project image (the package is installed there: no pip at run time)."""

from __future__ import annotations

from types import SimpleNamespace

from kfp import dsl

from components.baselines.component import baselines
from components.collect_rollouts.component import collect_rollouts
from components.distill.component import distill
from components.evaluate.component import evaluate
from components.register.component import register
from components.rollout.component import rollout
from components.validate.component import validate

FUNCTIONS = (validate, rollout, collect_rollouts, distill, baselines, evaluate, register)


def on_image(image: str) -> SimpleNamespace:
    """Every component on `image`, kfp neither installed nor upgraded at run time (the image has it)."""
    return SimpleNamespace(
        **{fn.__name__: dsl.component(fn, base_image=image, install_kfp_package=False) for fn in FUNCTIONS}
    )
