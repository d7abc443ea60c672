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


def test_each_run_goes_to_its_own_params_store_in_one_process(tmp_path, monkeypatch):
    """MLflow exports the URI it is given to MLFLOW_TRACKING_URI; the environment must still hold only the
    user's choice, or the second store's run would land in the first store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = []
    for name in ("a", "b"):
        config = TrackingConfig(uri=f"sqlite:///{tmp_path / name}.db", experiment="tracking-test")
        logger = RunLogger(config, "run", {}, tmp_path / f"{name}.jsonl", active=True)
        ids.append(logger.run_id)
        logger.close()
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ
    for name, run_id in zip(("a", "b"), ids):
        assert mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name}.db").get_run(run_id).info.run_id == run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'chosen.db'}")  # the user's choice stays and wins
    logger = RunLogger(TrackingConfig(uri=f"sqlite:///{tmp_path / 'a'}.db", experiment="tracking-test"), "run", {}, tmp_path / "c.jsonl", active=True)
    logger.close()
    assert mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'chosen.db'}").get_run(logger.run_id)
