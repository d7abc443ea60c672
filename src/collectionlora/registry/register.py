"""Registration and promotion of a collection in the MLflow model registry.

`register_collection`: one MLflow run holding the evaluation, the student logged as a pyfunc model
(models-from-code, safetensors artifacts), a new version of `registry.model_name` with lineage tags
and the model card as its description, alias `challenger` on it, and `champion` moved only by the
rule in promotion.py. A LoRA already registered under the name is reported, not registered again.
A version is created tagged `registration_pending` and the tag is removed once its aliases are set; a
registration that fails after creating it deletes it again (and puts back the aliases it took), and
one that was killed there leaves the tag, so the next registration of that LoRA deletes the version
first: no half-registered version is ever reported as registered.
`promote`: the same rule for a human choosing a version, with `--force` recording who and why.
"""

from __future__ import annotations

import getpass
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from collectionlora.bank import open_bank
from collectionlora.config import Params
from collectionlora.distill.export import COLLECTION, MODEL_CARD, SCHEDULER
from collectionlora.images import encode_png
from collectionlora.lorafile import atomic_write_text
from collectionlora.registry.card import version_description
from collectionlora.registry.inputs import RegistryError, evaluation_files, read_inputs
from collectionlora.registry.lineage import lineage_tags
from collectionlora.registry.promotion import CHALLENGER, CHAMPION, Score, decide_champion
from collectionlora.registry.serving import EFFECT, IMAGE, SEED, STEPS, encode_request_image, signature
from collectionlora.tracking import (
    flatten_params,
    one_line_error,
    open_experiment,
    redact,
    tracking_errors,
    tracking_uri,
)

REGISTRATION = "registration.json"
PENDING = "registration_pending"  # tag of a version whose registration has not finished (aliases not set yet)
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # logged as code, never imported here
MODEL_NAME_IN_RUN = "collection"
# What the model needs at load time besides collectionlora itself (pinned to this environment's versions).
RUNTIME_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "pillow", "numpy", "pandas", "pydantic", "pyyaml")


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    registered: bool  # False: this LoRA was registered before; `version` is that earlier version
    aliases: list[str]
    champion: str | None
    champion_moved: bool
    reason: str
    run_id: str | None
    model_uri: str
    tracking_uri: str

    def to_json(self) -> dict:
        return asdict(self)


def register_collection(
    params: Params, collection: Path, evaluation: Path, manifest: Path, out: Path | None, require_pass: bool = False, repo: Path = Path(".")
) -> Registration:
    """Register the collection evaluated in `evaluation`; writes `out`/registration.json when given."""
    inputs = read_inputs(collection, evaluation, manifest)
    if require_pass and not inputs.gate["passed"]:
        failed = "; ".join(c["detail"] for c in inputs.gate["checks"] if not c.get("passed"))
        raise RegistryError(f"{Path(evaluation) / 'gate.json'}: passed: false, not registered (--require-pass): {failed}")
    tags = lineage_tags(inputs, params, Path(repo))
    client, experiment_id = open_experiment(params.tracking)
    name = params.registry.model_name
    _remove_unfinished(client, name, inputs.lora_sha256)
    existing = _version_with_lora(client, name, inputs.lora_sha256)
    if existing is not None:
        champion = _champion(client, name)
        result = Registration(
            name, str(existing.version), False, _aliases_of(client, name, existing.version), champion, False,
            f"this LoRA is version {existing.version} already (lora_sha256 {inputs.lora_sha256[:12]}); nothing registered",
            existing.run_id, f"models:/{name}/{existing.version}", redact(tracking_uri(params.tracking)),
        )
    else:
        result = _register_new(params, inputs, tags, client, experiment_id, name)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / REGISTRATION, json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _register_new(params: Params, inputs, tags: dict[str, str], client, experiment_id: str, name: str) -> Registration:
    import mlflow

    exists = _model_exists(client, name)
    current = _champion(client, name) if exists else None
    current_score = _score_of(client, name, current) if current else None  # fails before anything is registered
    before = {CHALLENGER: _alias_holder(client, name, CHALLENGER), CHAMPION: current} if exists else {}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{inputs.record['name']}") as run:
        _log_evaluation(mlflow, params, inputs, tags)
        model = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(MODEL_CODE),
            artifacts=_model_artifacts(params, inputs),
            model_config={"base": params.base.model_dump(mode="json"), "sampling": params.sampling.model_dump(mode="json")},
            signature=signature(),
            input_example=_input_example(params, inputs),
            pip_requirements=_requirements(),
        )
    if not exists:
        client.create_registered_model(name, description="Effect LoRAs distilled into one few-step LoRA by collectionlora.")
    version = client.create_model_version(
        name, model.model_uri, run_id=run.info.run_id, tags={**tags, PENDING: "true"}, description=version_description(inputs, name),
        model_id=model.model_id,
    ).version
    version = str(version)
    try:
        client.set_registered_model_alias(name, CHALLENGER, version)
        decision = decide_champion(version, inputs.score, current, current_score)
        if decision.move:
            client.set_registered_model_alias(name, CHAMPION, version)
        client.delete_model_version_tag(name, version, PENDING)  # registered: the version is complete
    except BaseException as error:
        _withdraw(client, name, version, before, error)
        raise
    champion = version if decision.move else current
    return Registration(
        name, version, True, _aliases_of(client, name, version), champion, decision.move, decision.reason,
        run.info.run_id, f"models:/{name}/{version}", redact(tracking_uri(params.tracking)),
    )


def promote(params: Params, name: str, version: str, alias: str = CHAMPION, force: bool = False, reason: str | None = None) -> str:
    """Set `alias` on a version. `champion` follows the registry's rule unless forced; a forced
    promotion needs a reason and records who ($USER) and why as version tags. Returns one line."""
    from mlflow.exceptions import MlflowException

    if force and not (reason or "").strip():
        raise RegistryError("promote: --force needs --reason \"...\" (recorded with the version)")
    client, _ = open_experiment(params.tracking)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"promote: no version {version} of registered model '{name}' in {redact(tracking_uri(params.tracking))}") from None
    if alias == CHAMPION and not force:
        current = _champion(client, name)
        decision = decide_champion(version, _score_of(client, name, version), current, _score_of(client, name, current) if current else None)
        if not decision.move:
            raise RegistryError(f"promote: {decision.reason} (use --force --reason \"...\" to override)")
        line = decision.reason
    else:
        line = f"{alias} -> version {version}"
    client.set_registered_model_alias(name, alias, version)
    if force:
        user = getpass.getuser()
        client.set_model_version_tag(name, version, f"forced_{alias}_by", user)
        client.set_model_version_tag(name, version, f"forced_{alias}_reason", reason.strip())
        line += f" (forced by {user}: {reason.strip()})"
    return line


def describe_model(params: Params, name: str) -> list[dict]:
    """Every version of `name` with its aliases and gate tags, newest first (for `registry show`)."""
    from mlflow.exceptions import MlflowException

    client, _ = open_experiment(params.tracking)
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        raise RegistryError(f"registry: no registered model '{name}' in {redact(tracking_uri(params.tracking))}") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)
    return [
        {
            "version": str(v.version),
            "aliases": sorted(by_version.get(str(v.version), [])),
            "gate_passed": v.tags.get("gate_passed"),
            "judge_accuracy": v.tags.get("gate_judge_accuracy"),
            "bcr": v.tags.get("gate_bcr"),
            "lora_sha256": v.tags.get("lora_sha256", "")[:12],
            "git_commit": v.tags.get("git_commit", "")[:12],
        }
        for v in versions
    ]


def _log_evaluation(mlflow, params: Params, inputs, tags: dict[str, str]) -> None:
    mlflow.log_params(flatten_params(params.model_dump(mode="json")))
    mlflow.log_metrics(_numeric_metrics(inputs.metrics))
    mlflow.set_tags({**tags, "mlflow.note.content": f"Registration of {inputs.record['name']} (distill run {tags['distill_run_id']})"})
    mlflow.log_table(_table(inputs.per_effect), "evaluation/per_effect.json")
    for name, path in evaluation_files(inputs.evaluation).items():
        mlflow.log_artifact(str(path), "evaluation")


def _model_artifacts(params: Params, inputs) -> dict[str, str]:
    artifacts = {
        "lora": str(inputs.lora),
        "collection": str(inputs.collection / COLLECTION),
        "model_card": str(inputs.collection / MODEL_CARD),
    }
    if (inputs.collection / SCHEDULER).is_dir():  # the model card's diffusers route (older collections have none)
        artifacts["scheduler"] = str(inputs.collection / SCHEDULER)
    if params.base.is_embedded:  # small: shipped inside the model; a real base is referenced by id/path (tags)
        artifacts["base"] = str(open_bank(params.bank).base_dir)
    return artifacts


def _input_example(params: Params, inputs):
    import pandas as pd

    source = open_bank(params.bank).load_eval_sources()[0]
    effect = inputs.record["prompts"]["effects"][0]["effect"]
    return pd.DataFrame([{IMAGE: encode_request_image(encode_png(source)), EFFECT: effect, STEPS: len(inputs.record["timesteps"]), SEED: 0}])


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("collectionlora", *RUNTIME_PACKAGES):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def _numeric_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json's numbers as `<method>.<metric>` plus the context's scalars."""
    out = {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for method, summary in metrics.get("methods", {}).items():
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{method}.{key}"] = float(value)
    out["gate_passed"] = float(bool(metrics.get("gate", {}).get("passed")))
    return out


def _table(rows: list[dict[str, str]]) -> dict[str, list]:
    columns = list(rows[0])
    return {column: [_cell(row.get(column)) for row in rows] for column in columns}


def _cell(value: str | None):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _remove_unfinished(client, name: str, lora_sha256: str) -> None:
    """Delete the versions of this LoRA that a killed registration left tagged PENDING (so the LoRA is
    registered anew, not reported as registered by a version without its aliases)."""
    if not _model_exists(client, name):
        return
    for version in client.search_model_versions(f"name='{name}' and tags.lora_sha256='{lora_sha256}'"):
        if PENDING in version.tags:
            client.delete_model_version(name, version.version)
            print(f"registry: deleted version {version.version} of '{name}': an interrupted registration left it unfinished", file=sys.stderr)


def _withdraw(client, name: str, version: str, before: dict[str, str | None], error: BaseException) -> None:
    """Undo a registration that failed after creating `version`: delete it and give the aliases it may
    have taken back to their holders `before`. Raises a one-line RegistryError for an ordinary error."""
    try:
        client.delete_model_version(name, version)  # its aliases go with it
        for alias, holder in before.items():
            if holder is not None:
                client.set_registered_model_alias(name, alias, holder)
    except tracking_errors():
        raise RegistryError(
            f"registry: registering version {version} of '{name}' failed ({one_line_error(error)}) and so did deleting it: it stays tagged "
            f"{PENDING}, and the next `collectionlora register` of this LoRA deletes it"
        ) from error
    if isinstance(error, Exception):
        raise RegistryError(f"registry: registering version {version} of '{name}' failed ({one_line_error(error)}); the version was deleted, nothing is registered") from error


def _alias_holder(client, name: str, alias: str) -> str | None:
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def _version_with_lora(client, name: str, lora_sha256: str):
    if not _model_exists(client, name):
        return None
    found = client.search_model_versions(f"name='{name}' and tags.lora_sha256='{lora_sha256}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _model_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def _champion(client, name: str) -> str | None:
    """The version holding `champion` (MLflow returns versions as int or str depending on the store)."""
    return _alias_holder(client, name, CHAMPION)


def _aliases_of(client, name: str, version: str) -> list[str]:
    return sorted(alias for alias, v in client.get_registered_model(name).aliases.items() if str(v) == str(version))


def _score_of(client, name: str, version: str) -> Score:
    tags = client.get_model_version(name, version).tags
    try:
        return Score(tags["gate_passed"] == "true", float(tags["gate_judge_accuracy"]), float(tags["gate_bcr"]))
    except (KeyError, ValueError):
        raise RegistryError(f"registry: version {version} of '{name}' has no gate tags (not registered by collectionlora)") from None
