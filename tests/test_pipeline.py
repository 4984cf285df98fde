"""The spine end to end: Prefect flow -> DVC stages -> stage command -> MLflow runs, with a
real git + DVC repository, MLflow on SQLite, Prefect's test harness and an S3 endpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlflow
import pytest
import yaml

from latentforge import paths


def tiny(**sections) -> dict:
    """The tiny preset (what `--params presets/tiny.yaml` gives) with section overrides."""
    from conftest import REPO

    from latentforge.config import load_params

    raw = load_params(REPO / "presets/tiny.yaml").to_dict()
    for name, values in sections.items():
        raw[name].update(values)
    return raw


TINY = tiny(prepare={"max_images": 300})


def dvc(root, *args) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                          text=True, check=True).stdout


def cli(root, *args, check=True) -> subprocess.CompletedProcess:
    """`latentforge ARGS` in a subprocess, as a user runs it, against the harness's API."""
    import os

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run([sys.executable, "-m", "latentforge", *args], cwd=root, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"latentforge {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def runs(root, filter_string=""):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["latentforge"], filter_string=filter_string,
                              output_format="list")


def test_dvc_yaml_agrees_with_declared_paths():
    from conftest import REPO

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(spec) == list(paths.STAGES)
    for name, stage in paths.STAGES.items():
        declared = spec[name]
        assert declared["cmd"] == stage.cmd
        assert declared["deps"] == [*stage.code, *stage.deps]
        assert declared["params"] == list(stage.params)
        assert [next(iter(o)) if isinstance(o, dict) else o for o in declared["outs"]] == list(stage.outs)
        assert [next(iter(m)) for m in declared["metrics"]] == list(stage.metrics)
        # A failed stage keeps every previous output (DVC deletes the others before it runs)
        for entry in (*declared["outs"], *declared["metrics"], *declared.get("plots", [])):
            assert isinstance(entry, dict) and next(iter(entry.values()))["persist"], entry
        for code in stage.code:
            assert (REPO / code).is_file(), code


def test_run_skip_override_and_lock_parity(make_project, prefect_harness):
    a = make_project(TINY)
    b = make_project(TINY)
    table = cli(a, "run").stdout
    assert re.search(r"prepare\s+ran", table) and re.search(r"tokenizer\s+ran", table)
    assert "train_images=" in table and "val_psnr=" in table

    # `dvc repro` in an identical project leaves the same dvc.lock, and here finds nothing to do
    dvc(b, "repro")
    assert (a / "dvc.lock").read_text() == (b / "dvc.lock").read_text()
    assert "didn't change" in dvc(a, "repro")

    # a second run finds every stage up to date: the table says skipped, one line says why,
    # and the run is in Prefect (the no-op path: noop.py) but not in MLflow (nothing ran)
    again = cli(a, "run")
    assert re.search(r"prepare\s+skipped", again.stdout)
    assert re.search(r"evaluate\s+skipped", again.stdout)
    assert "nothing ran: every stage is up to date (Prefect flow run " in again.stderr
    # The flow itself (a temporary server per command, the UI's Run button) with nothing to do
    # opens no MLflow run either.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(a)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{a / 'mlflow.db'}")
        from latentforge.flows.pipeline import pipeline

        flowed = pipeline()
    assert {r["status"] for r in flowed} == {"skipped"} and len(flowed) == len(paths.STAGES)

    # MLflow: one parent per `latentforge run` that ran something, a child per stage execution,
    # with lineage tags
    (parent,) = runs(a, "tags.`latentforge.stage` = 'pipeline'")  # the no-op run opened none
    (newest,) = runs(a, "tags.`latentforge.stage` = 'prepare'")  # nor did it execute prepare
    tags = newest.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["latentforge.dvc_stage"] == "prepare"
    assert tags["latentforge.prefect_flow_run_id"]
    assert len(tags["latentforge.git_sha"].split("-")[0]) == 40
    assert newest.data.params["prepare.resolution"] == str(TINY["prepare"]["resolution"])
    assert newest.data.metrics["train_images"] + newest.data.metrics["val_images"] == 300
    sha = (a / "data/prepared/manifest.json").read_bytes()
    import hashlib

    full = hashlib.sha256(sha).hexdigest()
    inputs = {d.dataset.name: d.dataset for d in newest.inputs.dataset_inputs}
    assert inputs["prepared"].digest == full[:36]
    assert json.loads(inputs["prepared"].profile)["sha256"] == full
    assert tags["latentforge.input.prepared.sha256"] == full
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(newest.info.run_id)}
    assert {"manifest.json", "preview.png", "report.json"} <= artifacts

    # judge and tokenizer are registered models whose tags lead back to the data and judge
    client = mlflow.MlflowClient()
    registered = {m.name for m in client.search_registered_models()}
    assert {"latentforge-judge", "latentforge-tokenizer"} <= registered
    tok_run = max(runs(a, "tags.`latentforge.stage` = 'tokenizer'"), key=lambda r: r.info.start_time)
    model = mlflow.get_logged_model(tok_run.data.tags["latentforge.model.tokenizer"].split("/")[-1])
    assert model.tags["latentforge.prepared_sha256"] == full
    judge_sha = hashlib.sha256((a / "artifacts/judge/model.safetensors").read_bytes()).hexdigest()
    assert model.tags["latentforge.judge_sha256"] == judge_sha
    tok_inputs = {d.dataset.name: d.dataset.digest for d in tok_run.inputs.dataset_inputs}
    assert tok_inputs == {"prepared": full[:36], "judge": judge_sha[:36]}

    # every stage of the (full) run: its outputs, DVC metrics and plots, a child MLflow run
    # under that run's parent, and input digests equal to the upstream outputs' sha256
    def sha(rel: str) -> str:
        return hashlib.sha256((a / rel).read_bytes()).hexdigest()

    upstream = {"prepared": full, "judge": judge_sha, "tokenizer": sha("artifacts/tokenizer/model.safetensors"),
                "generator": sha("artifacts/generator/model.safetensors"),
                "rl": sha("artifacts/rl/model.safetensors"),
                "cache": sha("data/cache/manifest.json")}  # by content, not its key
    last_parent = parent.info.run_id
    for name, spec in paths.STAGES.items():
        for produced in (*spec.outs, *spec.metrics, *spec.plots):
            assert (a / produced).exists(), produced
        (run,) = runs(a, f"tags.`latentforge.stage` = '{name}' and "
                         f"tags.`mlflow.parentRunId` = '{last_parent}'")
        if name == "posttrain":  # off by default: it writes its marker and reads nothing
            assert run.data.metrics["enabled"] == 0
            continue
        linked = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert linked, f"{name} logged no inputs"
        for input_name, digest in linked.items():
            if input_name in upstream:
                assert digest == upstream[input_name][:36], (name, input_name)
    report = (a / "reports/evaluate/report.md").read_text()
    assert "base" in report and "RL" in report

    # Several RL seeds in one pipeline: -S edits params.yaml as `dvc exp run -S` would, and
    # only rl and evaluate rerun, seed 0 from its checkpoints; the report aggregates the three.
    table = cli(a, "run", "-S", "rl.seeds=[0, 1, 2]").stdout
    assert yaml.safe_load((a / "params.yaml").read_text())["rl"]["seeds"] == [0, 1, 2]
    rl_run = max(runs(a, "tags.`latentforge.stage` = 'rl'"), key=lambda r: r.info.start_time)
    assert yaml.safe_load(rl_run.data.params["rl.seeds"]) == [0, 1, 2]  # what the stage read
    assert rl_run.data.tags["mlflow.parentRunId"] != parent.info.run_id  # this run's parent
    assert re.search(r"rl\s+ran", table) and re.search(r"generator\s+skipped", table)
    seeds_parent = mlflow.get_run(rl_run.data.tags["mlflow.parentRunId"])
    assert yaml.safe_load(seeds_parent.data.params["rl.seeds"]) == [0, 1, 2]  # the -S values
    assert parent.data.params["rl.seeds"] != seeds_parent.data.params["rl.seeds"]
    assert seeds_parent.data.params["prepare.resolution"] == str(TINY["prepare"]["resolution"])
    assert sha("artifacts/rl/model.safetensors") == upstream["rl"]
    for seed in (1, 2):
        assert (a / f"artifacts/rl/seeds/seed_{seed}/model.safetensors").is_file()
    m = json.loads((a / "metrics/evaluate.json").read_text())
    assert m["seeds.n"] == 3 and m["distil.seeds"] == 3
    assert m["seeds.diff_gfd_eval_ci_low"] <= m["seeds.diff_gfd_eval"] <= \
        m["seeds.diff_gfd_eval_ci_high"]
    report = (a / "reports/evaluate/report.md").read_text()
    assert "| **mean of 3** |" in report and "](rl_seeds.png)" in report
    assert "didn't change" in dvc(a, "repro")

    # Decoder post-training on: posttrain, rl and evaluate rerun, and rl and evaluate decode with
    # the post-trained decoder (its digest among their inputs and in the report's protocol).
    table = cli(a, "run", "-S", "posttrain.enabled=true").stdout
    assert re.search(r"posttrain\s+ran\s+[\d.]+\s+gfd_eval_before=", table), table
    assert re.search(r"generator\s+skipped", table) and re.search(r"rl\s+ran", table)
    decoder = json.loads((a / "artifacts/decoder/decoder.json").read_text())
    assert decoder["tokenizer_sha256"] == upstream["tokenizer"]
    for name in ("rl", "evaluate"):
        run = max(runs(a, f"tags.`latentforge.stage` = '{name}'"),
                  key=lambda r: r.info.start_time)
        linked = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert linked.get("decoder") == decoder["sha256"][:36], (name, linked)
    protocol = json.loads((a / "reports/evaluate/protocol.json").read_text())
    assert protocol["decoder"]["sha256"] == decoder["sha256"]
    assert "didn't change" in dvc(a, "repro")

    # A prepare rerun that leaves the data as it was (only report.json records the setting)
    # reruns nothing after it: the later stages depend on the manifest, not the folder.
    before = sha("data/prepared/manifest.json")
    table = cli(a, "run", "-S", "prepare.on_bad_image=fail").stdout
    assert re.search(r"prepare\s+ran", table) and sha("data/prepared/manifest.json") == before
    assert json.loads((a / "data/prepared/report.json").read_text())["on_bad_image"] == "fail"
    for name in list(paths.STAGES)[1:]:
        assert re.search(rf"{name}\s+skipped", table), (name, table)
    assert "didn't change" in dvc(a, "repro")

    # A remote set on an up-to-date pipeline gets the outputs (the no-op answer never pushed),
    # once: the next run is a no-op again.
    remote = a.parent / f"{a.name}-remote"
    again = cli(a, "run", "-S", f"storage.remote={remote}")
    assert "nothing ran: every stage is up to date" not in again.stderr
    assert len([f for f in remote.rglob("*") if f.is_file()]) > 10, again.stderr[-2000:]
    assert "nothing ran: every stage is up to date" in cli(a, "run").stderr

    # the `dvc repro` run in project b logged a top-level run
    (solo,) = runs(b, "tags.`latentforge.stage` = 'prepare'")
    assert "mlflow.parentRunId" not in solo.data.tags
    assert solo.data.tags["latentforge.entry"] == "dvc repro"

    # Prefect shows the stage summary as a Markdown artifact
    from prefect.artifacts import Artifact

    artifact = Artifact.get("prepare-summary")
    assert artifact is not None and "train" in artifact.data


def test_failed_stage_exits_nonzero_and_keeps_previous_output(make_project, prefect_harness,
                                                             tmp_path):
    root = make_project(TINY)
    cli(root, "stage", "prepare")  # one stage through Prefect + DVC: a good previous output
    before = (root / "data/prepared/manifest.json").read_bytes()
    metrics = (root / "metrics/prepare.json").read_bytes()
    lock = (root / "dvc.lock").read_text()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x").mkdir()
    (tmp_path / "bad" / "x" / "broken.png").write_bytes(b"")
    proc = cli(root, "run", "-S", "prepare.source=folder", "-S", f"prepare.path={tmp_path / 'bad'}",
               "-S", "prepare.on_bad_image=fail", check=False)
    assert proc.returncode == 1
    err = proc.stderr
    assert "broken.png: empty file (0 bytes)" in err
    assert (root / "data/prepared/manifest.json").read_bytes() == before
    assert (root / "dvc.lock").read_text() == lock
    # Its metrics too: DVC deleted every output not persisted before the command ran, so the
    # stage read as changed (`dvc status`: deleted) even with the parameters put back.
    assert (root / "metrics/prepare.json").read_bytes() == metrics


# slow (~80 s): the default run stays under 15 min; CI runs it in test-infra, beside
# test_s3_end_to_end.py's team workflow on the same S3 server.
@pytest.mark.slow
def test_s3_source_mlflow_artifacts_and_dvc_remote(make_project, prefect_harness, s3_bucket):
    from PIL import Image

    from latentforge import storage

    for cls in ("a", "b"):
        for i in range(12):
            img = Image.new("L", (9, 9), 10 * i + (120 if cls == "b" else 0))
            import io

            buf = io.BytesIO()
            img.save(buf, format="PNG")
            storage.write_bytes_atomic(f"s3://{s3_bucket}/src/{cls}/{i}.png", buf.getvalue())
    params = tiny(prepare={"source": "folder", "path": f"s3://{s3_bucket}/src",
                           "val_fraction": 0.25},
                  tracking={"experiment": "s3exp", "artifact_location": f"s3://{s3_bucket}/mlflow"},
                  storage={"remote": f"s3://{s3_bucket}/dvc"})
    root = make_project(params)
    assert re.search(r"prepare\s+ran", cli(root, "run").stdout)
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["source"]["path"] == f"s3://{s3_bucket}/src"
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 24
    # the external S3 dependency is versioned in dvc.lock
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert f"s3://{s3_bucket}/src" in [d["path"] for d in lock["stages"]["prepare"]["deps"]]
    # MLflow wrote the stage's artifacts to S3
    s3_files = storage.list_files(f"s3://{s3_bucket}/mlflow")
    assert any(f.endswith("/artifacts/manifest.json") for f in s3_files)
    # `storage.remote` pushed the outputs to the DVC remote on S3
    assert storage.list_files(f"s3://{s3_bucket}/dvc")
    assert "Cache and remote 'storage' are in sync" in dvc(root, "status", "-c")


@pytest.mark.parametrize("bad", ["prepare.resolution=big", "prepare.nope=1"])
def test_flow_parameters_are_validated(prefect_harness, make_project, monkeypatch, bad):
    from latentforge.errors import ConfigError
    from latentforge.flows.stages import prepare as prepare_flow

    monkeypatch.chdir(make_project(TINY))
    with pytest.raises(ConfigError, match="prepare."):
        prepare_flow(overrides=[bad])


def test_deployments_cover_pipeline_and_every_stage():
    from latentforge.flows.deployments import build_deployments

    deployments = build_deployments()
    names = [d.flow_name for d in deployments]
    assert names == ["pipeline", *paths.STAGES, "experiment"]
    for d in deployments:
        props = d._parameter_openapi_schema.properties
        assert {"overrides", "force"} <= set(props)
        assert "params_file" in props or d.flow_name == "experiment"  # -S only: no file
        assert d.concurrency_limit == 1
        assert d.entrypoint.startswith("latentforge.flows.")
    # infra/prefect.yaml (work pools) deploys the same flows as `latentforge serve`.
    from conftest import REPO

    pool = yaml.safe_load((REPO / "infra/prefect.yaml").read_text())["deployments"]
    assert [d["entrypoint"].rsplit(":", 1)[1] for d in pool] == names


# slow (~2.5 min): the default run stays under 15 min; CI runs it in test-infra. The token
# generators' stages are also covered one by one in test_generator_stage.py and test_rl.py.
@pytest.mark.slow
def test_token_generators_through_latentforge_run(make_project, prefect_harness, tmp_path):
    """maskgit and ar over fsq codes through every stage by `latentforge run` (rl is GRPO over
    tokens), switching kind reruns only the generator onwards, and `latentforge sample` draws
    from each."""
    root = make_project(tiny(prepare={"max_images": 200}, tokenizer={"quantizer": "fsq"},
                             generator={"kind": "maskgit"}))
    table = cli(root, "run").stdout
    assert re.search(r"evaluate\s+ran", table)
    for kind in ("maskgit", "ar"):
        if kind == "ar":
            table = cli(root, "run", "-S", "generator.kind=ar").stdout
            assert re.search(r"cache\s+skipped", table) and re.search(r"rl\s+ran", table)
        meta = json.loads((root / "artifacts/generator/generator.json").read_text())
        assert meta["kind"] == kind and meta["model"]["vocab_size"] == 8 * 5 * 5 * 5
        rl_meta = json.loads((root / "artifacts/rl/generator.json").read_text())
        assert rl_meta["kind"] == kind and rl_meta["rl"]["params"]["token_kl_beta"] > 0
        m = json.loads((root / "metrics/rl.json").read_text())
        assert m["updates"] == 3 and m["final_kl"] >= 0
        ev = json.loads((root / "metrics/evaluate.json").read_text())
        assert 0 <= ev["base.eval_accuracy"] <= 1 and 0 <= ev["rl.eval_accuracy"] <= 1
        out = tmp_path / f"{kind}.png"
        cli(root, "sample", "--class", "3", "--n", "4", "--out", str(out))
        assert out.stat().st_size > 0
