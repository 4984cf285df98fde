"""Stage model folders (JSON config + safetensors): loading, and a clear error for each defect."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from latentforge import storage
from latentforge.errors import DataError
from latentforge.models.judge import Judge, JudgeModelConfig
from latentforge.tasks.judge import META, WEIGHTS, load_judge

CFG = JudgeModelConfig(image_size=8, channels=1, num_classes=3, width=4, feature_dim=8)


@pytest.fixture
def judge_dir(tmp_path):
    torch.manual_seed(0)
    model = Judge(CFG)
    folder = tmp_path / "judge"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps({"model": asdict(CFG), "class_names": list("abc")}))
    return folder, model


def test_a_good_folder_loads_the_same_weights_and_records_their_sha256(judge_dir):
    folder, model = judge_dir
    scorer = load_judge(folder)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(scorer.model.state_dict()[name], value)
    assert scorer.meta["sha256"] == storage.sha256_file(folder / WEIGHTS)


def _break(folder, defect: str) -> None:
    if defect == "no folder":
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    elif defect == "no meta":
        (folder / META).unlink()
    elif defect == "another stage's folder":
        (folder / META).rename(folder / "tokenizer.json")
    elif defect == "not json":
        (folder / META).write_text("{ half written")
    elif defect == "unknown config key":
        meta = json.loads((folder / META).read_text())
        meta["model"]["colour"] = 3
        (folder / META).write_text(json.dumps(meta))
    elif defect == "no weights":
        (folder / WEIGHTS).unlink()
    elif defect == "truncated weights":
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[:len(data) // 2])
    elif defect == "weights of another shape":
        meta = json.loads((folder / META).read_text())
        meta["model"]["width"] = 8
        (folder / META).write_text(json.dumps(meta))


@pytest.mark.parametrize(("defect", "names", "says"), [
    ("no folder", "", "no such folder; run the judge stage first"),
    ("no meta", META, "no judge here"),
    ("another stage's folder", "", "a tokenizer folder (tokenizer.json), not a judge one"),
    ("not json", META, "not a judge description"),
    ("unknown config key", META, "colour"),
    ("no weights", WEIGHTS, "missing beside"),
    ("truncated weights", WEIGHTS, "unreadable safetensors"),
    ("weights of another shape", WEIGHTS, "do not fit the model"),
])
def test_each_defect_is_a_data_error_naming_the_file(judge_dir, defect, names, says):
    folder, _ = judge_dir
    _break(folder, defect)
    with pytest.raises(DataError) as err:
        load_judge(folder)
    message = str(err.value)
    assert str(folder / names) in message and says in message
    assert "run the judge stage" in message


def test_a_missing_rl_seed_folder_names_the_rl_stage_and_its_seeds(tmp_path, monkeypatch):
    """`sample --model artifacts/rl/seeds/seed_1` with one RL seed said to run the
    generator stage, which would not write it."""
    from latentforge.tasks.generator import load_generator

    monkeypatch.chdir(tmp_path)
    for folder, says in (("artifacts/rl/seeds/seed_1", "run the rl stage first (it writes "
                          "seeds/seed_N for each seed after the first in rl.seeds)"),
                         ("artifacts/rl", "no such folder; run the rl stage first"),
                         ("artifacts/generator", "no such folder; run the generator stage")):
        with pytest.raises(DataError, match=re.escape(says)):
            load_generator(folder, tmp_path / "artifacts/tokenizer")


def test_a_registered_judge_predicts_through_mlflow_pyfunc_like_load_judge(judge_dir, tmp_path,
                                                                          monkeypatch, caplog):
    import warnings

    import mlflow.models
    import mlflow.pyfunc
    import numpy as np

    from latentforge import tracking
    from latentforge.config import TrackingConfig

    folder, _ = judge_dir
    evaluator = tmp_path / "evaluator"  # the judge stage logs both in one run
    shutil.copytree(folder, evaluator)
    meta = json.loads((evaluator / META).read_text())
    (evaluator / META).write_text(json.dumps({**meta, "role": "evaluator"}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        with tracking.start_run(TrackingConfig(), "judge", {}, root=tmp_path) as tracker:
            uri = tracker.log_model("judge", folder, "test-judge")
            evaluator_uri = tracker.log_model("evaluator", evaluator, "test-evaluator")
            run_id = tracker.run_id
    # The kind comes from the folder: no model_config param clashing between the two models.
    assert "Failed to log model config" not in caplog.text
    assert "kind" not in mlflow.MlflowClient().get_run(run_id).data.params
    assert mlflow.pyfunc.load_model(evaluator_uri).unwrap_python_model().kind == "evaluator"
    assert mlflow.pyfunc.load_model(uri).unwrap_python_model().kind == "judge"
    # MLflow warns without a predict type hint and without an input example; neither is noise
    # a user should read in every stage log.
    assert not [str(w.message) for w in caught
                if "type hint" in str(w.message) or "input example" in str(w.message)]
    signature = mlflow.models.get_model_info(uri).signature
    assert [(s.type, s.shape) for s in signature.inputs.inputs] == [(np.dtype("uint8"),
                                                                     (-1, 8, 8, 1))]
    assert [(s.type, s.shape) for s in signature.outputs.inputs] == [(np.dtype("float64"),
                                                                      (-1, 3))]
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    predicted = mlflow.pyfunc.load_model(uri).predict(images)
    np.testing.assert_allclose(predicted, load_judge(folder).score(images)[1], rtol=1e-6)
    assert predicted.shape == (5, 3)


def test_sample_refuses_a_registered_model_that_is_not_a_generator(judge_dir, tmp_path,
                                                                    monkeypatch, capsys):
    from latentforge import tracking
    from latentforge.cli import main
    from latentforge.config import TrackingConfig

    folder, _ = judge_dir
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.start_run(TrackingConfig(), "judge", {}, root=tmp_path) as tracker:
        uri = tracker.log_model("judge", folder, "test-judge")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    assert main(["sample", "--class", "0", "--model", uri, "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "a LatentForge judge model, not a generator" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_model_whose_s3_artifacts_cannot_be_reached_is_one_line(judge_dir, tmp_path,
                                                                  monkeypatch, capsys,
                                                                  s3_bucket):
    """With the artifact store on S3 and its endpoint down, `sample --model models:/...`
    printed 148 lines of botocore's chained tracebacks (MLflow does not wrap them)."""
    import socket

    from latentforge import tracking
    from latentforge.cli import main
    from latentforge.config import TrackingConfig

    folder, _ = judge_dir
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(experiment="on-s3", artifact_location=f"s3://{s3_bucket}/mlflow")
    with tracking.start_run(cfg, "judge", {}, root=tmp_path) as tracker:
        tracker.log_model("judge", folder, "test-judge-s3")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    with socket.socket() as closed:  # a port nothing listens on: the endpoint is down
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    assert main(["sample", "--class", "0", "--model", "models:/test-judge-s3/1", "--out",
                 str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    err = err[next(i for i, line in enumerate(err) if "Traceback" in line or
                   line.startswith("error: ")):]  # what sample printed (MLflow's store lines
    assert len(err) == 1 and err[0].startswith(  # before it are the fixture's)
        "error: --model models:/test-judge-s3/1: reading its artifacts: could not connect to "
        "the S3 endpoint; AWS settings looked at"), err
    assert not (tmp_path / "x.png").exists()


def test_a_damaged_rl_output_says_to_rerun_rl_not_the_generator(judge_dir, tmp_path,
                                                                 monkeypatch):
    """The rl stage writes generator folders: rerunning the generator stage (as the message
    said) retrains the base and everything after it, and leaves the damaged folder as it is."""
    from latentforge.checkpoint import load_model_folder

    folder, _ = judge_dir
    monkeypatch.chdir(tmp_path)

    def build(cfg: dict) -> Judge:
        return Judge(JudgeModelConfig(**cfg))

    seed = tmp_path / "artifacts/rl/seeds/seed_1"  # the project's rl folder, a seed of it
    shutil.copytree(folder, seed)
    _break(seed, "truncated weights")
    with pytest.raises(DataError, match="unreadable safetensors .*; run the rl stage to write"):
        load_model_folder(seed, META, "generator", build)
    elsewhere = tmp_path / "copied_rl_model"  # an rl model copied out: its meta says so
    shutil.copytree(folder, elsewhere)
    meta = json.loads((elsewhere / META).read_text())
    (elsewhere / META).write_text(json.dumps({**meta, "rl": {"params": {}}}))
    _break(elsewhere, "truncated weights")
    with pytest.raises(DataError, match="; run the rl stage to write"):
        load_model_folder(elsewhere, META, "generator", build)
    _break(folder, "truncated weights")  # a base generator's folder: the generator stage
    with pytest.raises(DataError, match="; run the generator stage to write"):
        load_model_folder(folder, META, "generator", build)
