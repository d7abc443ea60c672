"""Compiling the Kubeflow pipeline (pipelines/collectionlora_pipeline.py) to its IR YAML, and reading an
IR back through the kfp protobuf schemas, so that a broken file is refused before any upload."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

import yaml
from google.protobuf import json_format

from collectionlora.config import Params
from collectionlora.errors import PipelineError
from collectionlora.pipeline.distill_task import check_placement
from collectionlora.pipeline.task_params import params_json, shipped_effects, task_params
from collectionlora.validate import dvc_md5

IMAGE_ENV = "COLLECTIONLORA_IMAGE"  # the project image to run, overriding kfp.image at compile time
PIPELINE_MODULE = "pipelines.collectionlora_pipeline"


def project_image(params: Params) -> str:
    return os.environ.get(IMAGE_ENV) or params.kfp.image


def check_expressible(params: Params, cluster: bool = True) -> None:
    """What the pipeline cannot run, one line each: no bank in object storage for a cluster, GPUs that
    disagree with base.device, bank paths outside the imported bank root."""
    if cluster and not params.kfp.bank_uri:
        raise PipelineError(
            "params: kfp.bank_uri is null: a cluster run imports the bank from object storage (--set kfp.bank_uri=s3://bucket/prefix/data)"
        )
    check_placement(params)
    task_params(params_json(params), "/bank")
    if Path(params.bank.manifest).is_file():  # the bank beside data.dvc: unknown bank.effects ids fail here, not in a task
        shipped_effects(params)


def compile_pipeline(params: Params, out: Path, repo: Path = Path("."), cluster: bool = True) -> Path:
    """The pipeline with params.yaml's values as defaults, to `out` (written whole or not at all);
    deterministic: equal params, code and data.dvc give identical bytes."""
    from kfp import compiler

    check_expressible(params, cluster)
    pipeline = load_pipeline(repo).build_pipeline(params, project_image(params), data_version(repo))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        staged = Path(scratch) / out.name
        compiler.Compiler().compile(pipeline, str(staged))
        read_ir(staged)
        os.replace(staged, out)
    return out


def load_pipeline(repo: Path):
    """pipelines/collectionlora_pipeline.py of the repository at `repo` (components/ beside it)."""
    root = str(Path(repo).resolve())
    if not (Path(root) / "pipelines" / "collectionlora_pipeline.py").is_file():
        raise PipelineError(f"{root}/pipelines/collectionlora_pipeline.py: not found; run from the repository root (or pass --repo)")
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(PIPELINE_MODULE)


def data_version(repo: Path) -> str:
    """md5 of data.dvc's output (the bank the pipeline imports was pushed as it), or '' without one."""
    return dvc_md5(Path(repo) / "data.dvc") or ""


def read_ir(path: Path) -> tuple:
    """(PipelineSpec, PlatformSpec or None) parsed from an IR YAML; any schema error is one line."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    path = Path(path)
    try:
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise PipelineError(f"{path}: cannot read the pipeline IR ({' '.join(str(error).split())})") from error
    if not documents or not isinstance(documents[0], dict) or len(documents) > 2:
        raise PipelineError(f"{path}: expected a PipelineSpec document and an optional PlatformSpec document")
    try:
        spec = json_format.ParseDict(documents[0], pipeline_spec_pb2.PipelineSpec())
        platform = json_format.ParseDict(documents[1], pipeline_spec_pb2.PlatformSpec()) if len(documents) == 2 else None
    except json_format.ParseError as error:
        raise PipelineError(f"{path}: not a valid KFP pipeline IR ({' '.join(str(error).split())})") from error
    if not spec.pipeline_info.name or not spec.root.dag.tasks:
        raise PipelineError(f"{path}: pipelineInfo.name or root.dag.tasks is empty")
    return spec, platform
