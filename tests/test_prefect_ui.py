"""What people see in the Prefect UI: the Run form (typed, described parameters), deployment
names, the summary artifacts (MLflow run links, skipped stages marked) and a failed stage as
one ERROR line with its cause, in real flow runs against Prefect's test harness."""

from __future__ import annotations

import logging

import pytest
import yaml
from conftest import REPO
from test_pipeline import TINY

from latentforge import paths

SHARED = ("overrides", "params_file", "force", "params", "wait")


def flows() -> list:
    from latentforge.flows.pipeline import pipeline
    from latentforge.flows.stages import STAGE_FLOWS

    return [pipeline, *STAGE_FLOWS.values()]


def schema(flow) -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(flow.fn).model_dump()


def test_run_form_parameters_are_typed_and_described():
    pipeline, *stage_flows = flows()
    props = schema(pipeline)["properties"]
    assert list(props) == ["overrides", "params_file", "force", "stages", "params",
                           "wait"]

    # `stages`: a list of choices, exactly the stages of dvc.yaml in graph order
    dvc_stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    (listed,) = [t for t in props["stages"]["anyOf"] if t.get("type") == "array"]
    assert listed["items"]["enum"] == dvc_stages == list(paths.STAGES)

    # `overrides`: a list of KEY=VALUE strings, with an example; both written to params.yaml
    (listed,) = [t for t in props["overrides"]["anyOf"] if t.get("type") == "array"]
    assert listed["items"] == {"type": "string"}
    assert "prepare.resolution=32" in props["overrides"]["examples"][0]
    assert "KEY=VALUE" in props["overrides"]["description"]
    for name in ("overrides", "params_file"):
        assert "written into params.yaml" in props[name]["description"], name
    assert props["params_file"]["examples"] == ["presets/gpu.yaml"]
    assert props["force"]["type"] == "boolean" and "dvc repro --force" in props["force"]["description"]
    assert props["wait"]["type"] == "boolean" and props["wait"]["default"] is False
    assert "another run holds this workspace" in props["wait"]["description"]

    for flow in stage_flows:
        stage_props = schema(flow)["properties"]
        assert list(stage_props) == ["overrides", "params_file", "force", "parent_run_id",
                                     "params", "wait"]
        for name in SHARED:  # one text, whichever flow the Run form is for
            assert {**stage_props[name], "position": 0} == {**props[name], "position": 0}
        assert stage_props["parent_run_id"]["description"]
    for flow in flows():
        assert "params.yaml" in flow.description and "dvc exp run -S" in flow.description


def test_run_form_params_offer_every_key_with_its_doc_default_and_bounds():
    """The form's `params`: a block per params.yaml section, a field per key, labelled by the
    key, described by config.py's doc with the default, bounded as config.py bounds it."""
    import dataclasses

    from latentforge.config import SECTIONS, Params

    pipeline, *_ = flows()
    full = schema(pipeline)
    assert "section by section" in full["properties"]["params"]["description"]
    defs = full["definitions"]
    root = defs[full["properties"]["params"]["$ref"].rsplit("/", 1)[1]]
    assert list(root["properties"]) == list(SECTIONS) and root["additionalProperties"] is False
    defaults = Params()
    for section in SECTIONS:
        ref = root["properties"][section]["$ref"].rsplit("/", 1)[1]
        block = defs[ref]
        fields = dataclasses.fields(getattr(defaults, section))
        assert list(block["properties"]) == [f.name for f in fields], section
        assert block["additionalProperties"] is False
        for f in fields:
            prop = block["properties"][f.name]
            assert prop["title"] == f.name and prop["default"] is None
            assert prop["description"].startswith(f.metadata["doc"].rstrip(".")), f.name
            assert "Default " in prop["description"] and "keep params.yaml" in prop["description"]
    resolution = defs["PrepareParams"]["properties"]["resolution"]
    (number,) = [t for t in resolution["anyOf"] if t.get("type") == "integer"]
    assert (number["minimum"], number["maximum"]) == (4, 1024)  # as config.py bounds it
    (source,) = [t for t in defs["PrepareParams"]["properties"]["source"]["anyOf"] if "enum" in t]
    assert source["enum"] == ["digits", "shapes", "idx", "folder", "npz"]


def test_run_form_params_are_validated_then_become_overrides():
    from prefect.exceptions import ParameterTypeError

    from latentforge.config import load_params
    from latentforge.schema import as_overrides, form_model

    pipeline, *_ = flows()
    for bad in ({"prepare": {"resolution": 2}}, {"prepare": {"nope": 1}},
                {"rl": {"kl_beta": float("nan")}}, {"prepare": {"source": "imagenet"}}):
        with pytest.raises(ParameterTypeError, match="params"):
            pipeline.validate_parameters({"params": bad})
    changes = form_model().model_validate(
        {"prepare": {"resolution": 32, "resize_filter": "lanczos"},
         "tokenizer": {"fsq_levels": [8, 8, 8]}, "rl": {"rewards": {"judge_margin": 0.5}},
         "tracking": {"artifact_location": "s3://b/m"}, "judge": {}})
    overrides = as_overrides(changes)
    assert overrides == ['prepare.resolution=32', 'prepare.resize_filter=lanczos',
                         'tokenizer.fsq_levels=[8, 8, 8]', 'rl.rewards={judge_margin: 0.5}',
                         'tracking.artifact_location=s3://b/m']
    params = load_params(REPO / "params.yaml", overrides)  # -S reads the YAML back
    assert params.prepare.resolution == 32 and params.prepare.resize_filter == "lanczos"
    assert params.tokenizer.fsq_levels == [8, 8, 8]
    assert params.rl.rewards == {"judge_margin": 0.5}
    assert params.tracking.artifact_location == "s3://b/m"
    assert as_overrides(None) == [] and as_overrides(form_model()()) == []


def test_params_json_schema_matches_the_defaults(tmp_path):
    """`latentforge params --schema`: params.yaml's JSON Schema, whose defaults are config.py's
    and which a written-out default params.yaml satisfies."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import jsonschema

    from latentforge.config import Params, params_to_yaml

    cli = str(Path(sys.executable).parent / "latentforge")
    out = subprocess.run([cli, "params", "--schema"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    data = yaml.safe_load(params_to_yaml(Params()))
    jsonschema.validate(data, doc)
    bad = {**data, "prepare": {**data["prepare"], "resolution": 0}}
    with pytest.raises(jsonschema.ValidationError, match="minimum"):
        jsonschema.validate(bad, doc)
    prepare = doc["$defs"]["PrepareParams"]["properties"]
    assert prepare["resolution"]["default"] == Params().prepare.resolution


def test_run_form_rejects_an_unknown_stage():
    from prefect.exceptions import ParameterTypeError

    pipeline, *_ = flows()
    with pytest.raises(ParameterTypeError, match="stages"):
        pipeline.validate_parameters({"stages": ["prepare", "nope"]})


def test_deployments_are_named_after_their_flows(prefect_harness):
    from prefect.client.orchestration import get_client

    from latentforge.flows.deployments import build_deployments

    deployments = build_deployments()
    assert [d.name for d in deployments] == [d.flow_name for d in deployments]
    for d in deployments:
        d.apply()
    with get_client(sync_client=True) as client:
        for d in deployments:  # the UI and `prefect deployment ls` show "flow/deployment"
            deployed = client.read_deployment_by_name(f"{d.flow_name}/{d.flow_name}")
            props = deployed.parameter_openapi_schema["properties"]
            assert all(props[name].get("description") for name in props), d.flow_name
    # infra/prefect.yaml names its deployments the same way
    pool = yaml.safe_load((REPO / "infra/prefect.yaml").read_text())["deployments"]
    assert [d["name"] for d in pool] == [d.flow_name for d in deployments]
    assert [d["entrypoint"].rsplit(":", 1)[1] for d in pool] == [d["name"] for d in pool]


RAN = {"stage": "prepare", "status": "ran", "seconds": 5.51, "run_id": "acb1d51c" + "0" * 24,
       "metrics": {"train_images": 1618, "val_psnr": 25.2213}, "summary": "1618 train images"}
SKIPPED = {"stage": "judge", "status": "skipped", "seconds": 0.2, "run_id": "c33c7852" + "1" * 24,
           "metrics": {"val_accuracy": 0.9944}, "summary": "judge summary",
           "finished": 1764689760.0, "last_seconds": 18.0}


def test_mlflow_run_links(monkeypatch):
    from latentforge.flows.stages import mlflow_run_markdown, mlflow_ui_hint

    run = RAN["run_id"]
    server = "http://mlflow.example:5000/"
    assert mlflow_run_markdown(run, server, "7") == \
        f"[acb1d51c…](http://mlflow.example:5000/#/experiments/7/runs/{run}?workflowType=machine_learning)"
    # without the experiment id, MLflow's direct run route
    assert mlflow_run_markdown(run, server) == f"[acb1d51c…](http://mlflow.example:5000/#/runs/{run}?workflowType=machine_learning)"
    assert mlflow_ui_hint(server) == ""
    # a local store: the id, and the command that opens a UI on it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_run_markdown(run, None) == f"`{run}`"
    assert "`mlflow ui --backend-store-uri sqlite:///mlflow.db`" in mlflow_ui_hint(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/team.db")
    assert "mlflow ui --backend-store-uri sqlite:////data/team.db" in \
        mlflow_ui_hint("sqlite:////data/team.db")
    assert mlflow_run_markdown(None, server) == "not tracked"


def test_stage_summary_markdown_says_ran_or_skipped(monkeypatch):
    from latentforge.flows.stages import stage_summary_markdown

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ran = stage_summary_markdown(RAN, None)
    assert ran.startswith("## prepare: ran\n\n1618 train images")
    assert f"Ran in 5.5 s; MLflow run `{RAN['run_id']}`." in ran
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in ran
    assert "skipped" not in ran

    skipped = stage_summary_markdown(SKIPPED, "https://mlflow.example", "3")
    assert skipped.startswith("## judge: skipped\n\n**Up to date: skipped**, last run "
                              f"[c33c7852…](https://mlflow.example/#/experiments/3/runs/"
                              f"{SKIPPED['run_id']}?workflowType=machine_learning), finished "
                              "2025-12-02 15:36 UTC in 18.0 s.")
    assert "### Last run's summary\n\njudge summary" in skipped
    assert "Ran in" not in skipped and "mlflow ui" not in skipped

    pulled = stage_summary_markdown({"stage": "cache", "status": "skipped", "seconds": 0.1}, None)
    assert "**Up to date: skipped**, no run of it recorded in this workspace." in pulled

    # Run from `latentforge ui`'s deployments: a link into the MLflow UI it serves on the
    # local store, not a command to start another one
    monkeypatch.setenv("LATENTFORGE_MLFLOW_UI", "http://127.0.0.1:5071")
    served = stage_summary_markdown(RAN, "sqlite:///mlflow.db")
    assert (f"MLflow run [{RAN['run_id'][:8]}…](http://127.0.0.1:5071/#/runs/{RAN['run_id']}"
            "?workflowType=machine_learning).") in served
    assert "mlflow ui" not in served


def test_pipeline_table_marks_skipped_stages():
    from latentforge.flows.pipeline import pipeline_summary_markdown, stage_table_markdown

    server = "http://127.0.0.1:5000"
    rows = stage_table_markdown([RAN, SKIPPED], server, "0").splitlines()
    assert rows[2] == ("| prepare | ran | 5.5 | train_images=1618, val_psnr=25.22 | "
                       f"[acb1d51c…]({server}/#/experiments/0/runs/{RAN['run_id']}"
                       "?workflowType=machine_learning) |")
    assert rows[3] == ("| judge | **skipped** (up to date) | - | last run: val_accuracy=0.9944 | "
                       f"last run [c33c7852…]({server}/#/experiments/0/runs/{SKIPPED['run_id']}"
                       "?workflowType=machine_learning) |")
    summary = pipeline_summary_markdown([RAN, SKIPPED], "f" * 32, None)
    assert f"MLflow parent run `{'f' * 32}`. Browse the MLflow runs with `mlflow ui" in summary


def test_crash_cause_is_the_exception_else_dvcs_error():
    from latentforge.dvcops import crash_cause

    tail = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
            "    boom()", "RuntimeError: boom", "ERROR: failed to reproduce 'judge': failed to "
            "run: latentforge stage judge, exited with 1"]
    assert crash_cause(tail) == "RuntimeError: boom"
    assert crash_cause(tail[-1:]) == ("failed to reproduce 'judge': failed to run: "
                                      "latentforge stage judge, exited with 1")
    assert crash_cause(["12:00:01 INFO latentforge.tasks.judge: step 10"]) is None
    # Exceptions whose names end in neither Error nor Exception, and chained tracebacks.
    for last in ("zlib.error: Error -3 while decompressing data",
                 "zipfile.BadZipFile: File is not a zip file", "struct.error: unpack"):
        tail = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                "ValueError: first", "", "During handling of the above exception, another "
                "exception occurred:", "", "Traceback (most recent call last):",
                '  File "y.py", line 2, in f', "    g()", last,
                "ERROR: failed to reproduce 'prepare': failed to run: latentforge stage "
                "prepare, exited with 1"]
        assert crash_cause(tail) == last


def test_stage_artifact_after_a_run_and_a_skip(prefect_harness, make_project, monkeypatch):
    from prefect.artifacts import Artifact

    from latentforge.flows.stages import prepare
    from latentforge.runner import read_last_run

    monkeypatch.chdir(make_project(TINY))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert prepare()["status"] == "ran"
    run_id = read_last_run("prepare")["run_id"]
    ran = Artifact.get("prepare-summary").data
    assert ran.startswith("## prepare: ran") and f"MLflow run `{run_id}`" in ran

    assert prepare()["status"] == "skipped"
    skipped = Artifact.get("prepare-summary").data
    assert skipped.startswith("## prepare: skipped\n\n**Up to date: skipped**, last run "
                              f"`{run_id}`, finished ")
    assert "### Last run's summary" in skipped and "train" in skipped


def test_a_failed_stage_is_one_error_line_with_its_cause(prefect_harness, make_project,
                                                         monkeypatch, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    from latentforge.errors import LatentForgeError
    from latentforge.flows.pipeline import pipeline

    monkeypatch.chdir(make_project(TINY))
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "broken.png").write_bytes(b"")
    bad = ["prepare.source=folder", f"prepare.path={tmp_path / 'bad'}", "prepare.on_bad_image=fail"]
    # DEBUG reaches the API here (Prefect's default is INFO) to show where the traceback went
    runs_logger = logging.getLogger("prefect.flow_runs")
    level = runs_logger.level
    runs_logger.setLevel(logging.DEBUG)
    try:
        state = pipeline(overrides=bad, stages=["prepare"], return_state=True)
    finally:
        runs_logger.setLevel(level)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, LatentForgeError)  # what `latentforge run` prints and exits 1 on
    cause = f"stage 'prepare' failed: {tmp_path / 'bad' / 'x' / 'broken.png'}: empty file (0 bytes)"
    assert str(exc).startswith(cause)

    APILogHandler().flush()
    pipeline_run = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        (stage_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline_run])))
        assert stage_run.state.is_failed() and stage_run.state.message.startswith(cause)
        for run_id in (stage_run.id, pipeline_run):
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            errors = [log.message for log in logs if log.level >= logging.ERROR]
            assert len(errors) == 1 and errors[0].startswith(cause), errors
            assert "\n" not in errors[0]
            shown = [log.message for log in logs if log.level >= logging.INFO]
            assert not any("Traceback" in m for m in shown), shown
            assert any("Traceback" in log.message for log in logs if log.level == logging.DEBUG)


def test_a_deployment_run_that_fails_logs_one_error_line(prefect_harness, make_project,
                                                        monkeypatch):
    """A served deployment's run goes through Prefect's engine entry (`run_flow` with the flow
    run's logger as error_logger), which logged every failure a second time at ERROR with a
    47-60 line traceback: the UI's Logs tab showed it under the one line."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.flow_engine import flow_run_logger, run_flow
    from prefect.logging.handlers import APILogHandler

    from latentforge.errors import ConfigError
    from latentforge.flows.pipeline import pipeline

    monkeypatch.chdir(make_project(TINY))
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(pipeline, parameters={"overrides": ["judge.steps=abc"]})
    with pytest.raises(ConfigError, match="judge.steps = 'abc' is invalid"):
        run_flow(pipeline, flow_run=flow_run, error_logger=flow_run_logger(flow_run=flow_run))
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        assert client.read_flow_run(flow_run.id).state.is_failed()
    errors = [log.message for log in logs if log.level >= logging.ERROR]
    assert len(errors) == 1 and "judge.steps = 'abc' is invalid" in errors[0], errors
    assert not any("Traceback" in log.message for log in logs if log.level >= logging.INFO)


def test_a_stage_killed_by_a_signal_is_named_and_its_run_ended_failed(tmp_path, monkeypatch):
    """SIGKILL (the out-of-memory killer) gave `exited with -9` and left the stage's MLflow run
    RUNNING for ever: its process could not end it."""
    import os
    import subprocess
    import sys
    import textwrap

    import mlflow

    from latentforge import procs, tracking
    from latentforge.dvcops import crash_cause

    assert crash_cause(["ERROR: failed to reproduce 'judge': failed to run: latentforge stage "
                        "judge, exited with -9"]).endswith(
        "exited with -9 (SIGKILL: killed from outside, often by the out-of-memory killer (see "
        "`dmesg`))")
    assert crash_cause(["ERROR: failed to run: x, exited with -15"]).endswith("(SIGTERM)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(tmp_path)
    stage_run = textwrap.dedent(f"""
        import os, signal
        from latentforge import tracking
        from latentforge.config import TrackingConfig
        stage = os.environ["STAGE"]
        with tracking.start_run(TrackingConfig(experiment="e"), stage,
                                {{"latentforge.stage": stage}}, root={str(tmp_path)!r}):
            if stage == "judge":
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    for stage, invocation in (("judge", "inv1"), ("prepare", "inv1"), ("judge", "inv2")):
        env = {**os.environ, "STAGE": stage, procs.INVOCATION_ENV: invocation}
        subprocess.run([sys.executable, "-c", stage_run], env=env, check=False, timeout=120)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("e").experiment_id

    def statuses() -> list[tuple[str, str, str]]:
        return sorted((r.data.tags["latentforge.stage"], r.data.tags[procs.INVOCATION_TAG],
                       r.info.status) for r in client.search_runs([exp]))

    assert statuses() == [("judge", "inv1", "RUNNING"), ("judge", "inv2", "RUNNING"),
                          ("prepare", "inv1", "FINISHED")]
    # Where the stage flow says it logs (a UI-started run: no `latentforge` command watches).
    assert procs.end_stage_runs("judge", "inv1", [(uri, "e")]) == 1
    assert statuses() == [("judge", "inv1", "FAILED"), ("judge", "inv2", "RUNNING"),
                          ("prepare", "inv1", "FINISHED")]
