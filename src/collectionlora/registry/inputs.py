"""What a registration reads, checked before MLflow is touched: the collection (its LoRA must be the
one collection.json describes), the evaluation of that very LoRA (metrics.json, gate.json, the
per-effect table and plots), and validate's bank manifest. Every problem is one line naming the file
and field, so nothing half-registered is left behind."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from collectionlora.bank import file_sha256
from collectionlora.distill.export import LORA_WEIGHTS, MODEL_CARD, check_collection_files, read_collection
from collectionlora.errors import CollectionLoraError
from collectionlora.evaluate.report import BLEEDING, GATE, METRICS, PER_EFFECT, SAMPLES, TABLE
from collectionlora.registry.promotion import Score


class RegistryError(CollectionLoraError):
    """A registration or promotion that cannot go ahead; nothing was registered."""


@dataclass(frozen=True)
class RegistrationInputs:
    collection: Path
    record: dict
    lora: Path
    lora_sha256: str
    evaluation: Path
    metrics: dict
    gate: dict
    per_effect: list[dict[str, str]]  # rows of per_effect.csv
    manifest: dict
    manifest_sha256: str

    @property
    def score(self) -> Score:
        """The gated student's result: the gate metric the champion rule compares."""
        student = self.metrics["methods"][self.gate["student"]]
        return Score(bool(self.gate["passed"]), float(student["judge_accuracy"]), float(student["bcr"]))

    @property
    def student_rows(self) -> list[dict[str, str]]:
        """per_effect.csv rows of the gated student."""
        return [row for row in self.per_effect if row["method"] == self.gate["student"]]


def evaluation_files(evaluation: Path) -> dict[str, Path]:
    """The evaluation files a registration needs and logs with its run."""
    return {name: Path(evaluation) / name for name in (METRICS, GATE, PER_EFFECT, TABLE, BLEEDING, SAMPLES)}


def read_inputs(collection: Path, evaluation: Path, manifest: Path) -> RegistrationInputs:
    collection, evaluation, manifest = Path(collection), Path(evaluation), Path(manifest)
    record = read_collection(collection)
    lora = collection / LORA_WEIGHTS
    check_collection_files(collection, record, lora)
    lora_sha256 = record["files"][LORA_WEIGHTS]
    if not (collection / MODEL_CARD).is_file():
        raise RegistryError(f"{collection / MODEL_CARD}: missing (the collection's model card; re-run distill)")

    metrics = _read_json(evaluation / METRICS, "run `collectionlora evaluate` first")
    gate = _read_json(evaluation / GATE, "run `collectionlora evaluate` first")
    evaluated = metrics.get("student_lora_sha256")
    if evaluated is None:
        raise RegistryError(f"{evaluation / METRICS}: student_lora_sha256: missing (an evaluation from an older version; re-run evaluate)")
    if evaluated != lora_sha256:
        raise RegistryError(
            f"{evaluation / METRICS}: student_lora_sha256: this evaluation is of another LoRA than {lora} (re-run evaluate on this collection)"
        )
    _check_gate(evaluation / GATE, gate, metrics)
    for name, path in evaluation_files(evaluation).items():
        if not path.is_file():
            raise RegistryError(f"{path}: missing ({name} of the evaluation; re-run evaluate)")
    per_effect = _read_per_effect(evaluation / PER_EFFECT, gate["student"])

    manifest_record = _read_json(manifest, "run `collectionlora validate` first")
    effects = {e.get("id") for e in manifest_record.get("effects", []) if isinstance(e, dict)}
    missing = [e["id"] for e in record["effects"] if e["id"] not in effects]
    if missing:
        raise RegistryError(f"{manifest}: effects: the validated bank lacks the collection's effects {missing} (a manifest of another bank)")
    return RegistrationInputs(
        collection, record, lora, lora_sha256, evaluation, metrics, gate, per_effect, manifest_record, file_sha256(manifest)
    )


def _read_json(path: Path, hint: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path}: missing ({hint})") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RegistryError(f"{path}: not readable JSON ({' '.join(str(error).split())})") from error
    if not isinstance(value, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    return value


def _check_gate(path: Path, gate: dict, metrics: dict) -> None:
    if not isinstance(gate.get("passed"), bool):
        raise RegistryError(f"{path}: passed: expected true or false")
    if not isinstance(gate.get("checks"), list) or not all(isinstance(c, dict) and "detail" in c for c in gate["checks"]):
        raise RegistryError(f"{path}: checks: expected a list of checks with a detail each")
    if gate["passed"] != all(c.get("passed") is True for c in gate["checks"]):
        raise RegistryError(f"{path}: passed: disagrees with its checks")
    student = gate.get("student")
    summary = metrics.get("methods", {}).get(student) if isinstance(metrics.get("methods"), dict) else None
    if not isinstance(summary, dict):
        raise RegistryError(f"{path}: student: {student!r} is not a method of {path.with_name(METRICS)}")
    for key in ("judge_accuracy", "bcr"):
        if not isinstance(summary.get(key), (int, float)):
            raise RegistryError(f"{path.with_name(METRICS)}: methods.{student}.{key}: expected a number")


def _read_per_effect(path: Path, student: str) -> list[dict[str, str]]:
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RegistryError(f"{path}: not a readable CSV ({error})") from error
    if not rows or not {"method", "effect", "judge_accuracy"} <= set(rows[0]):
        raise RegistryError(f"{path}: expected columns method, effect, judge_accuracy")
    if not any(row["method"] == student for row in rows):
        raise RegistryError(f"{path}: method: no rows of the gated student {student!r}")
    return rows
