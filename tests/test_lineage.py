"""Lineage in MLflow: the experiment kind, tags that lead from every registered version back to
the prepared data, dataset sources that name content, and `latentforge lineage`.

The chain fixture runs prepare -> judge -> tokenizer -> cache -> generator -> posttrain -> rl
on the tiny preset through `runner.execute_stage` (each stage its own MLflow run, as DVC runs them) into
an SQLite store; the walk below then uses MLflow's client API alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from latentforge import lineage, paths, runner, tracking
from latentforge.config import TrackingConfig, build_params, load_params, write_params_file
from latentforge.errors import LatentForgeError

REPO = Path(__file__).resolve().parents[1]
CHAIN = ("prepare", "judge", "tokenizer", "cache", "generator", "posttrain", "rl")
RL_MODEL = lineage.REGISTERED_MODELS["rl"].name


def client_for(root):
    import mlflow

    uri = tracking.tracking_uri(root)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_local):
    """A project folder after the seven stages ran with tracking on; yields its root."""
    root = tmp_path_factory.mktemp("lineage")
    raw = load_params(REPO / "presets/tiny.yaml").to_dict()
    raw["prepare"]["max_images"] = 300
    raw["posttrain"]["enabled"] = True  # rl then decodes through its decoder: a data input
    params = build_params(raw)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")  # a DVC project: inputs get dvc_path
    write_params_file(params, root / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for stage in CHAIN:
            runner.execute_stage(stage, params, root)
        yield root


def test_new_and_untagged_experiments_become_model_training_ones(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.start_run(TrackingConfig(), "prepare", {}, root=tmp_path):
        pass
    client = client_for(tmp_path)
    new = client.get_experiment_by_name("latentforge")
    assert new.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    tracking.use_tracking_uri(tmp_path)
    where = (tmp_path / "mlartifacts").as_uri()
    mlflow.create_experiment("older", where)  # as LatentForge created it before it set the kind
    mlflow.create_experiment("chosen", where,
                             tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("older", "chosen"):
        with tracking.start_run(TrackingConfig(experiment=name), "prepare", {}, root=tmp_path):
            pass
    kinds = {n: client.get_experiment_by_name(n).tags[tracking.EXPERIMENT_KIND_TAG]
             for n in ("older", "chosen")}
    assert kinds == {"older": "custom_model_development", "chosen": "genai_development"}


def test_lineage_says_in_one_line_what_is_wrong_with_a_model_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for bad in ("artifacts/rl", "runs:/abc/generator", "models:/"):
        with pytest.raises(LatentForgeError, match="models:/NAME/VERSION") as err:
            lineage.cmd_lineage(bad, tmp_path)
        assert "\n" not in str(err.value)
    with pytest.raises(LatentForgeError, match="no MLflow store at"):
        lineage.cmd_lineage("models:/latentforge-judge/1", tmp_path)
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create an empty store

    folder = tmp_path / "judge"
    folder.mkdir()
    (folder / "judge.json").write_text(json.dumps(
        {"model": {"image_size": 8, "channels": 1, "num_classes": 3}}))
    with tracking.start_run(TrackingConfig(), "judge", {}, root=tmp_path) as tracker:
        tracker.log_model("judge", folder, "test-judge")
    for unknown in ("models:/test-judge/7", "models:/nothing/1", "models:/test-judge@champion"):
        with pytest.raises(LatentForgeError) as err:
            lineage.cmd_lineage(unknown, tmp_path)
        message = str(err.value)
        assert message.startswith(f"{unknown}: no such registered model version")
        assert "registered models: test-judge" in message and "\n" not in message


def test_mlflow_alone_walks_from_the_rl_generator_back_to_the_prepared_data(chain):
    client = client_for(chain)
    experiment = client.get_experiment_by_name("latentforge")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    manifest_sha = hashlib.sha256((chain / paths.PREPARED / "manifest.json").read_bytes()).hexdigest()
    weights = {s: hashlib.sha256((chain / d / "model.safetensors").read_bytes()).hexdigest()
               for s, d in (("judge", paths.JUDGE), ("tokenizer", paths.TOKENIZER),
                            ("generator", paths.GENERATOR), ("rl", paths.RL))}
    cache_key = json.loads((chain / paths.CACHE / "manifest.json").read_text())["key"]

    # RL fine-tunes are their own registered model; the base generator's has only base versions
    (rl_version,) = client.search_model_versions(f"name = '{RL_MODEL}'")
    assert [v.tags["latentforge.stage"] for v in
            client.search_model_versions("name = 'latentforge-generator'")] == ["generator"]

    def version(ref: str):
        name, number = ref.split("/")
        return client.get_model_version(name, number)

    def check_version(mv, stage: str) -> dict[str, str]:
        tags = mv.tags
        assert tags["latentforge.stage"] == stage
        assert tags["latentforge.prepared_sha256"] == manifest_sha
        assert tags["latentforge.weights_sha256"] == weights[stage]
        assert client.get_run(mv.run_id).data.tags["latentforge.stage"] == stage
        # the description says what it is and names every upstream version
        # as Markdown links the MLflow UI follows
        assert mv.description and "\n" not in mv.description
        view = "?workflowType=machine_learning"  # the UI's model-training view
        run_page = f"#/experiments/{client.get_run(mv.run_id).info.experiment_id}/runs/{mv.run_id}"
        assert f"[{mv.run_id}]({run_page}{view})" in mv.description
        for key, value in tags.items():
            if key.startswith("latentforge.upstream.") and not key.endswith("_run"):
                name, number = value.split("/")
                assert f"[{value}](#/models/{name}/versions/{number}{view})" in mv.description
        return tags

    rl_tags = check_version(rl_version, "rl")
    assert rl_tags["latentforge.cache_key"] == cache_key
    base = version(rl_tags["latentforge.upstream.generator"])
    assert base.run_id == rl_tags["latentforge.upstream.generator_run"]
    base_tags = check_version(base, "generator")
    assert rl_tags["latentforge.base_generator_sha256"] == base_tags["latentforge.weights_sha256"]
    assert base_tags["latentforge.cache_key"] == cache_key

    cache_run = client.get_run(base_tags["latentforge.upstream.cache_run"])
    assert cache_run.data.tags["latentforge.stage"] == "cache"
    # found by content: the manifest's sha256 (the key names tokenizer + data, not the latents)
    cache_sha = hashlib.sha256((chain / paths.CACHE / "manifest.json").read_bytes()).hexdigest()
    assert cache_run.data.tags["latentforge.output.cache.sha256"] == cache_sha
    # The post-trained decoder RL decoded through: found by its digest, like the cache.
    decoder_meta = json.loads((chain / paths.DECODER / "decoder.json").read_text())
    decoder_run = client.get_run(rl_tags["latentforge.upstream.decoder_run"])
    assert decoder_run.data.tags["latentforge.stage"] == "posttrain"
    assert decoder_run.data.tags["latentforge.output.decoder.sha256"] == decoder_meta["sha256"]
    assert decoder_run.data.tags["latentforge.upstream.generator"] == \
        rl_tags["latentforge.upstream.generator"]
    prepare_run = client.get_run(cache_run.data.tags["latentforge.upstream.prepared_run"])
    assert prepare_run.data.tags["latentforge.stage"] == "prepare"
    assert prepare_run.data.tags["latentforge.output.prepared.sha256"] == manifest_sha
    assert prepare_run.data.params["prepare.source"] == "digits"

    tok = version(base_tags["latentforge.upstream.tokenizer"])
    assert tok.name == "latentforge-tokenizer" and version(
        cache_run.data.tags["latentforge.upstream.tokenizer"]).version == tok.version
    tok_tags = check_version(tok, "tokenizer")
    judge = version(tok_tags["latentforge.upstream.judge"])
    judge_tags = check_version(judge, "judge")
    # every path ends at the one prepare run
    for tags in (rl_tags, base_tags, tok_tags, judge_tags):
        assert tags["latentforge.upstream.prepared_run"] == prepare_run.info.run_id

    # and every reference anywhere in the chain resolves
    seen, todo = set(), [("version", f"{RL_MODEL}/{rl_version.version}")]
    while todo:
        kind, ref = todo.pop()
        if (kind, ref) in seen:
            continue
        seen.add((kind, ref))
        tags = version(ref).tags if kind == "version" else client.get_run(ref).data.tags
        for key, value in tags.items():
            if key.startswith("latentforge.upstream."):
                todo.append(("run" if key.endswith("_run") else "version", value))
    assert {ref.split("/")[0] for kind, ref in seen if kind == "version"} == {
        RL_MODEL, "latentforge-generator", "latentforge-tokenizer", "latentforge-judge",
        "latentforge-evaluator"}
    assert {client.get_run(ref).data.tags["latentforge.stage"] for kind, ref in seen
            if kind == "run"} == {"prepare", "judge", "tokenizer", "cache", "generator",
                                  "posttrain"}


def test_runs_log_every_param_their_stage_reads_and_what_decided_the_numerics(chain):
    """rl reads generator.sample_steps and generator.sampler, which DVC records for it: its run
    logs them and its params digest covers them, so two rl runs differing only there differ in
    MLflow and in `latentforge lineage`; the fp32 Linear backend and thread count are tagged."""
    from types import SimpleNamespace

    import torch

    from latentforge.lineage import params_digest
    from latentforge.models.layers import fp32_linear_backend

    client = client_for(chain)
    (rl_run,) = client.search_runs(
        [client.get_experiment_by_name("latentforge").experiment_id],
        "tags.`latentforge.stage` = 'rl'")
    logged = rl_run.data.params
    used = load_params(chain / "params.yaml")
    assert logged["generator.sample_steps"] == str(used.generator.sample_steps)
    assert logged["generator.sampler"] == str(used.generator.sampler)
    assert logged["compute.precision"] == str(used.compute.precision)
    assert not any(k.startswith(("tokenizer.", "judge.")) for k in logged)  # not read by rl
    assert rl_run.data.tags["latentforge.fp32_linear"] == fp32_linear_backend()
    assert rl_run.data.tags["latentforge.torch_threads"] == str(torch.get_num_threads())
    # the code that ran, by digest (the chain's folder holds no code to differ from)
    assert rl_run.data.tags["latentforge.code_sha256"] == paths.code_sha256("rl")
    assert "latentforge.code_differs_from_workspace" not in rl_run.data.tags

    def digest(**changed: str) -> str:  # a run logging these params instead
        return params_digest(SimpleNamespace(data=SimpleNamespace(params={**logged, **changed})),
                             "rl")

    base = digest()
    assert base == params_digest(rl_run, "rl")
    assert digest(**{"generator.sample_steps": "999"}) != base
    assert digest(**{"tokenizer.width": "999"}) == base  # rl does not read it


def test_datasets_name_content_not_workspace_folders(chain):
    import mlflow.artifacts

    client = client_for(chain)
    (rl_version,) = client.search_model_versions(f"name = '{RL_MODEL}'")
    for stage in CHAIN:
        (run,) = client.search_runs([client.get_experiment_by_name("latentforge").experiment_id],
                                    f"tags.`latentforge.stage` = '{stage}'")
        for d in run.inputs.dataset_inputs:
            ds = d.dataset
            if ds.name == "source":  # the external source: scikit-learn's embedded digits
                continue
            source = json.loads(ds.source)["uri"]
            assert ds.source_type == "mlflow_artifact", (stage, ds.name, ds.source)
            assert source.startswith(("runs:/", "models:/")), (stage, ds.name, source)
            assert str(chain) not in ds.source
            profile = json.loads(ds.profile)
            assert profile["sha256"].startswith(ds.digest)
            assert profile["dvc_path"] in {str(p) for p in (paths.PREPARED, paths.CACHE,
                                                            paths.JUDGE, paths.EVALUATOR,
                                                            paths.TOKENIZER, paths.GENERATOR,
                                                            paths.DECODER)}
    # the content they name is where they say: the prepared manifest, byte for byte
    prepare_id = rl_version.tags["latentforge.upstream.prepared_run"]
    local = mlflow.artifacts.download_artifacts(f"runs:/{prepare_id}/manifest.json",
                                                tracking_uri=tracking.tracking_uri(chain))
    assert (chain / paths.PREPARED / "manifest.json").read_bytes() == Path(local).read_bytes()


def test_lineage_command_prints_every_hop_and_the_source(chain):
    client = client_for(chain)
    (rl_version,) = client.search_model_versions(f"name = '{RL_MODEL}'")
    manifest_sha = rl_version.tags["latentforge.prepared_sha256"]
    text = lineage.cmd_lineage(f"models:/{RL_MODEL}/{rl_version.version}", chain)
    print(text)
    lines = text.splitlines()
    assert lines[1].startswith(f"rl: {RL_MODEL}/{rl_version.version}  stage rl  "
                               f"run {rl_version.run_id}  params ")
    # the chain back to the data, nearest stage first, each hop once
    hops = [line.strip().split(":")[0] for line in lines[1:] if "stage " in line]
    # the evaluator (the generator's and rl's grader) hangs off the generator, after the data;
    # the decoder rl decoded through comes from the posttrain run of that generator
    assert hops == ["rl", "generator", "cache", "tokenizer", "judge", "prepared", "evaluator",
                    "decoder"]
    assert any(line.startswith("  decoder: stage posttrain  run ") for line in lines)
    for name in ("latentforge-generator/1", "latentforge-tokenizer/1", "latentforge-judge/1",
                 "latentforge-evaluator/1"):
        assert sum(f"{name}  stage" in line for line in lines) == 1, name
    assert any(line.strip().startswith("cache: stage cache  run ") for line in lines)
    assert f"data: prepared sha256 {manifest_sha} from prepare run " in text
    assert lines[-1].startswith("source: digits (source fingerprint ")
    assert "also tokenizer, judge, evaluator, prepared (shown above)" in text  # several paths

    # the judge stage's second model is named by its role, not by the stage that made it
    evaluator = lineage.cmd_lineage("models:/latentforge-evaluator/1", chain).splitlines()
    assert evaluator[1].startswith("evaluator: latentforge-evaluator/1  stage judge  run ")

    # an alias leads to the same chain
    client.set_registered_model_alias(RL_MODEL, "champion", rl_version.version)
    assert lineage.cmd_lineage(f"models:/{RL_MODEL}@champion", chain).splitlines()[1:] == lines[1:]


def test_sample_takes_the_registered_rl_generator(chain, capsys):
    from latentforge.cli import main

    (rl_version,) = client_for(chain).search_model_versions(f"name = '{RL_MODEL}'")
    out = chain / "rl_samples.png"
    assert main(["sample", "--class", "3", "--n", "2", "--steps", "2", "--model",
                 f"models:/{RL_MODEL}/{rl_version.version}", "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and "wrote 2 samples" in capsys.readouterr().out


def test_lineage_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from latentforge.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["lineage", "not-a-model-uri"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not-a-model-uri" in err[0]


def test_sample_with_an_unknown_or_storeless_model_is_one_line(chain, tmp_path, monkeypatch,
                                                                capsys):
    """An unknown registered model is one line naming it (MLflow's own first line), as in
    lineage; outside a project no empty store is created."""
    from latentforge.cli import main

    monkeypatch.chdir(chain)
    assert main(["sample", "--class", "3", "--model", "models:/nope/1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model models:/nope/1: ") and \
        "nope" in err[0][len("error: --model models:/nope/1: "):], err
    known = sorted(m.name for m in client_for(chain).search_registered_models())
    assert known and err[0].endswith(f"; registered models: {', '.join(known)}"), err
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["sample", "--class", "3", "--model", "models:/nope/1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no MLflow store at {tmp_path / 'mlflow.db'}: run the pipeline first "
                   "(here: the project root), or set MLFLOW_TRACKING_URI"]
    assert list(tmp_path.iterdir()) == []


def test_the_first_live_producer_of_the_same_bytes_is_the_one_named(tmp_path, monkeypatch):
    """A DVC experiment's copy retrains what git's commit lacks and registers identical
    weights again: a workspace model's lineage then pointed into that experiment (the newest
    version), and broke once its runs were deleted."""
    from latentforge.lineage import REGISTERED_MODELS, WEIGHTS_TAG, find_producer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = []
    for name in ("workspace judge", "experiment judge"):
        with tracking.start_run(TrackingConfig(), name, {}, root=tmp_path) as tracker:
            ids.append(tracker.run_id)
    client = client_for(tmp_path)
    model = REGISTERED_MODELS["judge"].name
    client.create_registered_model(model)
    digest = "ab" * 32
    for run_id in ids:
        client.create_model_version(model, f"runs:/{run_id}/judge", run_id,
                                    tags={WEIGHTS_TAG: digest})
    experiment = client.get_experiment_by_name("latentforge").experiment_id
    found = find_producer(client, experiment, "judge", digest)
    assert found is not None and (found.run_id, found.version) == (ids[0], f"{model}/1")
    client.delete_run(ids[0])  # a producer whose run is gone is not offered
    found = find_producer(client, experiment, "judge", digest)
    assert found is not None and (found.run_id, found.version) == (ids[1], f"{model}/2")
