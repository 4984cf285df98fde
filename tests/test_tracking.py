"""MLflow inputs: the source type each kind of path resolves to, digests, no spurious warnings."""

from __future__ import annotations

import json
import warnings

import pytest

from latentforge import tracking
from latentforge.config import TrackingConfig


def test_log_input_resolves_each_source_kind_quietly_and_keeps_the_full_sha256(tmp_path,
                                                                              monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sha = "ab" * 32
    sources = {"local": str(tmp_path / "prepared"), "remote": "s3://bucket/images",
               "embedded": "sklearn:digits"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracking.start_run(TrackingConfig(), "prepare", {}, root=tmp_path) as tracker:
            for name, source in sources.items():
                tracker.log_input(name, source, sha, context="prepare", profile={"count": 3})
            run_id = tracker.run_id
    ambiguous = [w for w in caught if "interpreted in multiple ways" in str(w.message)]
    assert not ambiguous, [str(w.message) for w in ambiguous]

    run = mlflow.MlflowClient(tracking.tracking_uri(tmp_path)).get_run(run_id)
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert {n: d.source_type for n, d in inputs.items()} == {
        "local": "local", "remote": "s3", "embedded": "code"}
    for name, source in sources.items():
        assert source in inputs[name].source
        assert inputs[name].digest == sha[:tracking.MLFLOW_DIGEST_LEN]
        assert json.loads(inputs[name].profile) == {"sha256": sha, "count": 3}
        assert run.data.tags[f"{tracking.TAG_PREFIX}input.{name}.sha256"] == sha


def test_disabled_tracking_yields_a_null_tracker(tmp_path):
    with tracking.start_run(TrackingConfig(enabled=False), "prepare", {}, root=tmp_path) as t:
        t.log_input("x", str(tmp_path), "00" * 32, context="prepare")
    assert type(t) is tracking.Tracker and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("raised, status", [
    ("prefect", "KILLED"), ("ctrl-c", "KILLED"), ("error", "FAILED")])
def test_a_run_ends_killed_on_an_interrupt_however_it_arrives(tmp_path, monkeypatch, raised,
                                                               status):
    """SIGTERM inside a flow arrives as Prefect's TerminationSignal, not our Interrupted: the
    pipeline's parent run ended FAILED on a `kill` (a CI timeout read as a failed pipeline)."""
    import signal

    import mlflow
    from prefect.exceptions import TerminationSignal

    from latentforge import procs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exc = {"prefect": TerminationSignal(signal.SIGTERM), "ctrl-c": procs.Interrupted(),
           "error": RuntimeError("boom")}[raised]
    with pytest.raises(type(exc)), \
            tracking.start_run(TrackingConfig(), "pipeline", {}, root=tmp_path) as tracker:
        raise exc
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    assert client.get_run(tracker.run_id).info.status == status


def test_log_model_registers_without_live_progress_bars(tmp_path, monkeypatch, capfd):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    folder = tmp_path / "judge"
    folder.mkdir()
    (folder / "judge.json").write_text(json.dumps(
        {"model": {"image_size": 8, "channels": 1, "num_classes": 3}}))
    with tracking.start_run(TrackingConfig(), "judge", {}, root=tmp_path) as tracker:
        uri = tracker.log_model("judge", folder, "test-judge")
    assert "Downloading artifacts" not in capfd.readouterr().err
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    assert [v.version for v in client.search_model_versions("name='test-judge'")] == [1]
    assert uri and uri.startswith("models:/")


def test_end_invocation_runs_ends_only_this_commands_running_runs(tmp_path, monkeypatch):
    """What `latentforge run` does after Ctrl-C once its stage is stopped: a stage killed
    after its grace period leaves its run RUNNING; the command ends it KILLED, and leaves
    finished runs and other commands' runs alone."""
    import mlflow

    from latentforge import procs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(procs, "_mlflow_targets", set())
    cfg, uri = TrackingConfig(), tracking.tracking_uri(tmp_path)
    ids = {}
    for name, invocation, finish in [("stuck", "mine", False), ("done", "mine", True),
                                     ("other", "theirs", False)]:
        monkeypatch.setenv(procs.INVOCATION_ENV, invocation)
        with tracking.start_run(cfg, name, {}, root=tmp_path) as tracker:
            ids[name] = tracker.run_id
        if not finish:  # as if the process died inside the run
            mlflow.MlflowClient(uri).update_run(ids[name], status="RUNNING")
    monkeypatch.setenv(procs.INVOCATION_ENV, "mine")
    assert procs.end_invocation_runs() == 0  # nothing watched yet
    procs.watch_mlflow(uri, cfg.experiment)
    assert procs.end_invocation_runs() == 1
    client = mlflow.MlflowClient(uri)
    assert {n: client.get_run(i).info.status for n, i in ids.items()} == {
        "stuck": "KILLED", "done": "FINISHED", "other": "RUNNING"}


def test_artifacts_of_a_shared_sqlite_store_sit_beside_it(tmp_path, monkeypatch):
    """A store two projects share kept its artifacts in whichever project created the
    experiment: deleting that project lost the other's artifacts and registered models."""
    import mlflow

    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared / 'store.db'}")
    project = tmp_path / "project"
    project.mkdir()
    with tracking.start_run(TrackingConfig(), "prepare", {}, root=project):
        pass
    exp = mlflow.MlflowClient().get_experiment_by_name("latentforge")
    assert exp.artifact_location == (shared / "mlartifacts").as_uri()
    # the project's own store (the default): beside it, in the project
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.local_artifact_root(tracking.tracking_uri(project), project) == \
        (project / "mlartifacts").resolve().as_uri()


def test_an_artifact_location_the_existing_experiment_lacks_is_said(tmp_path, monkeypatch,
                                                                    caplog):
    """MLflow fixes an experiment's artifact location when it is made: a later
    tracking.artifact_location (s3://...) was ignored in silence, and a typo in the first one
    could not be corrected by fixing it."""
    import logging

    import mlflow

    from latentforge import tracking
    from latentforge.config import TrackingConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = (tmp_path / "first").as_uri()
    with tracking.start_run(TrackingConfig(artifact_location=first), "a", {}, root=tmp_path):
        pass
    with caplog.at_level(logging.WARNING, logger="latentforge.tracking"):
        with tracking.start_run(TrackingConfig(artifact_location=first + "/"), "b", {},
                                root=tmp_path):
            pass
        assert "artifact_location" not in caplog.text  # the same place
        other = (tmp_path / "other").as_uri()
        with tracking.start_run(TrackingConfig(artifact_location=other), "c", {},
                                root=tmp_path) as run:
            pass
    assert (f"tracking.artifact_location = {other!r} is not where MLflow experiment "
            f"'latentforge' keeps its artifacts ({first})") in caplog.text
    assert "set tracking.experiment to a new name" in caplog.text
    assert mlflow.get_run(run.run_id).info.artifact_uri.startswith(first)  # where they went
