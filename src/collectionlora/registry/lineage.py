"""Lineage of a registered version, as MLflow tags: which code, data, params, rollouts, training run
and gate produced it, so a version in the UI leads back to everything needed to reproduce it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from collectionlora.config import Params
from collectionlora.registry.inputs import RegistrationInputs

KFP_RUN_ID_ENV = "KFP_RUN_ID"  # set by the Kubeflow pipeline on its register task
GIT_COMMIT_ENV = "COLLECTIONLORA_GIT_COMMIT"  # baked into the project image (Dockerfile), which has no .git
UNKNOWN = "unknown"


def lineage_tags(inputs: RegistrationInputs, params: Params, repo: Path) -> dict[str, str]:
    """Tags for the model version (MLflow tag values are strings)."""
    record, score = inputs.record, inputs.score
    base = inputs.manifest.get("base", {})
    failed = [c["detail"] for c in inputs.gate["checks"] if not c.get("passed")]
    return {
        "lora_sha256": inputs.lora_sha256,
        "git_commit": git_commit(repo),
        "data_dvc_md5": str(inputs.manifest.get("data_dvc_md5") or UNKNOWN),
        "bank_manifest_sha256": inputs.manifest_sha256,
        "params_sha256": params_sha256(params),
        "rollout_index_sha256": rollout_digest(record.get("rollout_index_sha256", {})),
        "distill_run_id": str(record.get("tracking_run_id") or UNKNOWN),
        "kfp_run_id": os.environ.get(KFP_RUN_ID_ENV) or "none",
        "base": str(record["base"].get("model") or record["base"].get("path")),
        "base_transformer_sha256": str(base.get("transformer_sha256") or UNKNOWN),
        "effects": str(len(record["effects"])),
        "gate_passed": str(score.gate_passed).lower(),
        "gate_judge_accuracy": f"{score.judge_accuracy:.6f}",
        "gate_bcr": f"{score.bcr:.6f}",
        "gate_summary": gate_summary(inputs.gate["checks"], failed),
    }


def gate_summary(checks: list[dict], failed: list[str]) -> str:
    passed = len(checks) - len(failed)
    return f"{passed}/{len(checks)} checks passed" + (f"; {'; '.join(failed)}" if failed else "")


def params_sha256(params: Params) -> str:
    """sha256 of the validated params (every section, canonical JSON): equal params, equal hash."""
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def rollout_digest(per_effect: dict[str, str]) -> str:
    """One digest of the per-effect rollout index hashes the student was trained on."""
    if not per_effect:
        return UNKNOWN
    return hashlib.sha256(json.dumps(per_effect, sort_keys=True).encode()).hexdigest()


def git_commit(repo: Path) -> str:
    """HEAD of the repository at `repo`, with '-dirty' when tracked files differ; outside git (the
    project image) the commit the image was built from, else 'unknown'."""
    try:
        head = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(GIT_COMMIT_ENV) or UNKNOWN
    return head + ("-dirty" if dirty else "")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()
