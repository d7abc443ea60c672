"""MLflow run logging: a resumed checkpoint continues its run, or starts a new one where that run is unknown."""

from __future__ import annotations

from collectionlora.config import TrackingConfig
from collectionlora.tracking import RunLogger


def test_a_resume_continues_its_run_and_an_unknown_run_starts_a_new_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="tracking-test")
    first = RunLogger(config, "run", {"a": {"b": 1}}, tmp_path / "m.jsonl", active=True)
    first.log({"loss": 1.0}, 1)
    first.close()
    again = RunLogger(config, "run", {}, tmp_path / "m.jsonl", active=True, resume_run_id=first.run_id)
    assert again.run_id == first.run_id
    again.close()
    moved = RunLogger(config, "run", {"a": {"b": 1}}, tmp_path / "m.jsonl", active=True, resume_run_id="0123456789abcdef0123456789abcdef")
    assert moved.run_id not in (None, first.run_id)
    moved.close()
    assert "0123456789abcdef0123456789abcdef of the checkpoint is not in" in capsys.readouterr().err
