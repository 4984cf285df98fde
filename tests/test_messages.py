"""A second run on one workspace, a full disk, a missing file and a params.yaml edited while a
stage ran each end in one line that names the cause and the path, exit non-zero, and leave no
half-written output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_pipeline import TINY

from latentforge import workspace


def latentforge(root, *args, env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items()
           if not k.startswith("PREFECT_API") and k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "latentforge", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_second_run_on_one_workspace_is_refused_naming_the_holder(make_project):
    root = make_project(TINY)
    params_before = (root / "params.yaml").read_bytes()
    with workspace.lock(root, what="latentforge run (the first one)"):
        for args in (["run", "-S", "prepare.seed=5"], ["stage", "prepare"],
                     ["stage", "prepare", "--no-dvc"]):
            proc = latentforge(root, *args)
            assert proc.returncode == 1, proc.stderr
            line = one_error_line(proc.stderr)
            assert f"pid {os.getpid()}" in line and "latentforge run (the first one)" in line
            assert str(root / ".latentforge/run.lock") in line
        # Nested use in one process (the pipeline flow calls the stage flows) is allowed.
        with workspace.lock(root):
            pass
    # Nothing of the refused runs happened: params.yaml untouched, no stage output.
    assert (root / "params.yaml").read_bytes() == params_before
    assert not (root / "data/prepared").exists()


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_output(make_project):
    root = make_project(TINY)
    data = root / "data"
    # An 8 KiB filesystem over data/ in a private mount namespace (root only, as the cluster
    # tests' isolated node): the prepared shards (~20 KiB) do not fit.
    script = (f"mount -t tmpfs -o size=8k tmpfs {data} && cd {root} && "
              f"{sys.executable} -m latentforge stage prepare --no-dvc; ")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(["unshare", "-m", "sh", "-c",
                           script + f"code=$?; ls -A {data} > {root}/left.txt; exit $code"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert line.startswith("error: no space left on device: "), line
    assert str(data) in line or "data/" in line, line
    # atomic_dir removed its temporary folder: nothing half-written is left on that disk.
    assert (root / "left.txt").read_text().split() == [], (root / "left.txt").read_text()
    assert not (root / "metrics/prepare.json").exists()


def test_a_missing_input_is_one_line_naming_it(make_project, tmp_path):
    root = make_project(TINY)
    shutil.rmtree(root / "data/prepared", ignore_errors=True)
    proc = latentforge(root, "stage", "judge", "--no-dvc")
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "data/prepared/manifest.json" in line and "run the prepare stage first" in line
    assert not (root / "artifacts/judge").exists()

    proc = latentforge(root, "run", "--params", str(tmp_path / "nowhere.yaml"))
    assert proc.returncode == 2
    assert str(tmp_path / "nowhere.yaml") in one_error_line(proc.stderr)


def test_an_os_error_without_a_handler_is_one_line_with_the_traceback_under_verbose(
        tmp_path, capsys):
    from latentforge.cli import describe_os_error

    err = OSError(28, "No space left on device")
    assert describe_os_error(err).startswith("no space left on device: (file not named")
    err = FileNotFoundError(2, "No such file or directory", str(tmp_path / "x.npz"))
    assert describe_os_error(err).startswith(f"file not found: {tmp_path / 'x.npz'}")


def test_wait_queues_behind_the_holder_and_dvc_repro_respects_the_lock(make_project):
    import time

    root = make_project(TINY)
    with workspace.lock(root, what="the first run"):
        # Children of this process would inherit the holder's mark; an unrelated shell's
        # `dvc repro` does not have it.
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", workspace.HOLDER_ENV)}
        # A plain `dvc repro` stage takes the same lock: refused while a run holds it.
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=root,
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode != 0
        assert "another run is using this workspace" in proc.stdout + proc.stderr
        assert not (root / "data/prepared").exists()

        waiting = subprocess.Popen(
            [sys.executable, "-m", "latentforge", "stage", "prepare", "--no-dvc", "--wait"],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        seen = ""
        while "waiting for the workspace" not in seen:
            assert waiting.poll() is None and time.monotonic() < deadline, seen
            seen += waiting.stderr.readline()
        assert "the first run" in seen
        time.sleep(2)
        assert waiting.poll() is None  # still queued while the lock is held
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-3000:]
    assert (root / "data/prepared/manifest.json").exists()


def test_a_stage_flow_refuses_a_busy_workspace(make_project, prefect_harness, monkeypatch):
    import pytest

    from latentforge.flows.stages import prepare

    root = make_project(TINY)
    monkeypatch.chdir(root)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from latentforge import workspace\n"
         "with workspace.lock(what='deployment run A'):\n"
         "    print('held', flush=True); time.sleep(120)"],
        cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workspace.WorkspaceBusy, match="deployment run A"):
            prepare(overrides=["prepare.seed=3"])
        assert "seed: 3" not in (root / "params.yaml").read_text()  # nothing was written
    finally:
        holder.kill()
        holder.wait()


def test_params_edited_while_a_stage_runs_under_dvc_repro_fail_it_unrecorded(make_project,
                                                                            monkeypatch):
    """DVC reads params.yaml into dvc.lock when the stage returns: an edit made meanwhile
    (the user setting up the next run) would be locked in for outputs the old values made.
    `latentforge run` writes the used values back (test_dvcops); under a plain `dvc repro`
    the stage itself fails, unrecorded."""
    import mlflow
    import yaml

    from latentforge import runner, tracking
    from latentforge.config import load_params
    from latentforge.tasks import prepare

    root = make_project(TINY)
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_STAGE", "prepare")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = (root / "params.yaml").read_bytes()
    params = load_params(root / "params.yaml")
    real = prepare.run_stage

    def edited_meanwhile(section, key, value):
        def run_stage(p, tracker):  # the user's edit, while the stage works
            raw = yaml.safe_load((root / "params.yaml").read_text())
            raw[section][key] = value
            (root / "params.yaml").write_text(yaml.safe_dump(raw))
            return real(p, tracker)
        return run_stage

    # An edit to a section the stage does not read changes nothing DVC records for it.
    monkeypatch.setattr(prepare, "run_stage", edited_meanwhile("rl", "kl_beta", 7.0))
    runner.execute_stage("prepare", params, root, params_text=text)
    assert (root / "metrics/prepare.json").exists()

    (root / "metrics/prepare.json").unlink()
    (root / "params.yaml").write_bytes(text)
    resolution = params.prepare.resolution
    monkeypatch.setattr(prepare, "run_stage", edited_meanwhile("prepare", "resolution", 12))
    with pytest.raises(runner.ParamsChangedError) as caught:
        runner.execute_stage("prepare", params, root, params_text=text)
    message = str(caught.value)
    assert f"prepare.resolution: {resolution} -> 12" in message and "params.yaml" in message
    assert "kl_beta" not in message and "\n" not in message  # one line, this stage's keys
    assert not (root / "metrics/prepare.json").exists()  # nothing recorded as this run's
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(root))
    (exp,) = [e for e in client.search_experiments() if e.name == params.tracking.experiment]
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id]))
    assert statuses == ["FAILED", "FINISHED"]

    # Without the bytes (under `latentforge run`, whose reproduce() fixes dvc.lock instead,
    # or `--no-dvc`, where nothing records params) there is no check.
    runner.execute_stage("prepare", params, root)


def test_the_params_check_reads_dotted_keys_and_unreadable_files(tmp_path):
    """judge records compute.precision, not the rest of compute; a file that no longer
    parses is one line naming it."""
    import yaml

    from latentforge import runner

    before = {"judge": {"steps": 10}, "compute": {"precision": "fp32", "num_workers": 1}}
    text = yaml.safe_dump(before).encode()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {**before, "compute": {"precision": "fp32", "num_workers": 4}}))
    runner.check_params_unchanged("judge", text, tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {**before, "compute": {"precision": "bf16", "num_workers": 1}}))
    with pytest.raises(runner.ParamsChangedError, match=r'compute.precision: "fp32" -> "bf16"'):
        runner.check_params_unchanged("judge", text, tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**before, "judge": {}}))
    with pytest.raises(runner.ParamsChangedError, match=r"judge.steps: 10 -> \(absent\)"):
        runner.check_params_unchanged("judge", text, tmp_path)
    (tmp_path / "params.yaml").write_text("judge: [unclosed\n  steps: 1\n")
    with pytest.raises(runner.ParamsChangedError) as caught:
        runner.check_params_unchanged("judge", text, tmp_path)
    assert "can no longer be read" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--class", "3", "--steps", "-5"],
     "argument --steps: expected a step count 1..10000, got -5"),
    (["sample", "--class", "3", "--steps", "0"],
     "argument --steps: expected a step count 1..10000, got 0"),
    (["sample", "--class", "3", "--cfg", "nan"], "argument --cfg: expected a finite number, "
     "got nan"),
    (["sample", "--class", "3", "--cfg", "inf"], "argument --cfg: expected a finite number"),
    (["sample", "--class", "3", "--cfg", "-1"], "argument --cfg: expected a CFG scale >= 0"),
    (["sample", "--class", "3", "--n", "0"], "argument --n: expected a count 1..100000, got 0"),
    (["sample", "--class", "3", "--n", "10000000"], "argument --n: expected a count 1..100000"),
    (["sample", "--class", "3", "--n", "two"], "argument --n: expected an integer, got 'two'"),
    (["sample", "--class", "3", "--seed", "-1"], "argument --seed: expected a seed 0..9223372036854775807"),
    (["server", "start", "--port", "70000"],
     "argument --port: expected a TCP port 1..65535, got 70000"),
    (["ui", "--mlflow-port", "-1"], "argument --mlflow-port: expected a TCP port 1..65535"),
    (["serve", "--limit", "0"], "argument --limit: expected a run count >= 1, got 0"),
    (["run", "--exp", "", "-S", "prepare.seed=3"],
     "argument --exp: expected an experiment name without spaces, got ''"),
    (["run", "--exp", "my seed"], "argument --exp: expected an experiment name without spaces"),
])
def test_command_line_values_out_of_range_are_argparse_errors(argv, message, capsys):
    """Exit 2 with the usage line and one error naming the option, before anything runs."""
    from latentforge.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_verbose_goes_before_or_after_the_command_and_bounds_match_the_config():
    from latentforge import cli, config

    parse = cli.build_parser().parse_args
    assert parse(["-v", "stage", "prepare"]).verbose is True
    assert parse(["stage", "prepare", "-v"]).verbose is True
    assert parse(["sample", "--class", "1", "--verbose"]).verbose is True
    assert parse(["stage", "prepare"]).verbose is False
    assert (cli.MAX_SAMPLE_STEPS, cli.MAX_SAMPLES, cli.MAX_SEED) == (
        config.MAX_SAMPLE_STEPS, config.MAX_PER_CLASS, config.MAX_SEED)


def test_a_copy_without_git_is_one_line_saying_what_to_do(make_project, capsys, monkeypatch):
    """A downloaded copy (no .git, but .dvc committed): DVC would end in an SCMError
    traceback. core.no_scm (DVC without git) is let through."""
    from latentforge.cli import main

    root = make_project()
    shutil.rmtree(root / ".git")
    monkeypatch.chdir(root)
    assert main(["run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {root.resolve()} is not inside a git repository, and DVC versions "
                   "the pipeline through git: run `git init` here (a downloaded copy has no "
                   ".git), or `dvc config core.no_scm true` to go without"]
    assert not (root / "dvc.lock").exists()
    from latentforge.cli import _dvc_no_scm

    assert not _dvc_no_scm()
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.no_scm", "true"], cwd=root,
                   check=True)
    assert _dvc_no_scm()


def test_dvc_failing_inside_its_status_is_one_line(make_project, capsys, monkeypatch):
    from latentforge.cli import main

    root = make_project()
    (root / "dvc.yaml").write_text("stages:\n  prepare: [unclosed\n")
    monkeypatch.chdir(root)
    assert main(["run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: dvc status of {root.resolve()} "
                                               "failed: "), err


def test_an_experiment_name_git_cannot_hold_is_one_line_before_any_run(make_project,
                                                                       prefect_harness):
    """DVC refused such names only after the experiment's MLflow parent run was open (each
    retry left a FAILED one), and the flow's failure printed Prefect's traceback."""
    from test_pipeline import cli

    from latentforge.errors import ConfigError
    from latentforge.flows.experiment import check_name

    for good in ("seed3", "exp/one", "lr-3e-4"):
        check_name(good)
    for bad in ("x.lock", "a~b", "a:b", "/x"):
        with pytest.raises(ConfigError, match="not a name git can hold"):
            check_name(bad)
    root = make_project()
    for bad in ("a..b", "-x"):  # through the command line and the flow
        proc = cli(root, "run", f"--exp={bad}", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "Flow run" not in proc.stderr, proc.stderr[-3000:]  # refused before the flow
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: experiment name {bad!r}: not a name git can hold (no spaces, "
                          "'..', '~^:?*[\\', a leading '-' or '/', or a trailing '.lock')"], \
            proc.stderr[-3000:]
    assert not (root / "mlflow.db").exists()  # no parent run was opened


def test_a_skipped_stage_names_only_the_run_that_made_its_outputs(tmp_path, caplog):
    """After `git checkout` + `dvc checkout` (or `dvc exp apply`, `dvc pull`) the outputs and
    metrics/<stage>.json come from elsewhere while `.latentforge/last/` (not versioned) still
    names this workspace's last run: the table, Prefect's summary and the parent MLflow run
    then show the checked-out metrics, not that run's. A damaged record is a warning."""
    from latentforge import paths
    from latentforge.runner import skipped_record

    record, metrics = tmp_path / paths.last_run_file("judge"), tmp_path / paths.metrics_file("judge")
    record.parent.mkdir(parents=True)
    metrics.parent.mkdir(parents=True)
    record.write_text(json.dumps({"stage": "judge", "run_id": "OLDRUN", "seconds": 3.0,
                                  "metrics": {"val_accuracy": 0.91}, "summary": "judge 0.91"}))
    metrics.write_text(json.dumps({"val_accuracy": 0.91}))
    own = skipped_record("judge", tmp_path)
    assert own["run_id"] == "OLDRUN" and own["metrics"] == {"val_accuracy": 0.91}

    metrics.write_text(json.dumps({"val_accuracy": 0.97}))  # another commit's outputs
    other = skipped_record("judge", tmp_path)
    assert other["metrics"] == {"val_accuracy": 0.97}
    assert other["run_id"] is None and other["summary"] == ""

    record.write_text('{"stage": "judge", "run_id": "ab')  # cut by a full disk or a crash
    with caplog.at_level("WARNING"):
        damaged = skipped_record("judge", tmp_path)
    assert damaged["metrics"] == {"val_accuracy": 0.97} and damaged["run_id"] is None
    assert "damaged run record" in caplog.text and str(record) in caplog.text


def test_a_skipped_stage_shows_the_same_key_metrics_as_a_run_one(tmp_path):
    """The table shows a stage's first four metrics; the file a skipped stage's come from keeps
    the stage's order (headline first), not an alphabetical one."""
    from latentforge.cli import format_table
    from latentforge.runner import skipped_record, write_metrics_file

    metrics = {"val_psnr": 26.4, "val_ssim": 0.93, "rfd_judge": 0.07, "judge_acc_originals": 0.99,
               "judge_acc_ratio": 1.0, "judge_acc_recon": 0.98}
    write_metrics_file("tokenizer", metrics, tmp_path)
    skipped = skipped_record("tokenizer", tmp_path)
    assert list(skipped["metrics"]) == list(metrics)
    ran = format_table([{"stage": "tokenizer", "status": "ran", "metrics": metrics}])
    again = format_table([{**skipped, "status": "ran"}])
    assert ran == again and "val_psnr=26.4, val_ssim=0.93, rfd_judge=0.07" in again


def test_a_damaged_or_locked_mlflow_store_is_one_line_and_left_as_it_is(make_project):
    """The store holds every run and the model registry: a damaged one is named, with what to
    do, and never moved or rewritten; a locked one says so (no 85-line SQLAlchemy traceback)."""
    import sqlite3

    root = make_project(TINY)
    db = root / "mlflow.db"
    garbage = os.urandom(5000)
    db.write_bytes(garbage)
    proc = latentforge(root, "stage", "prepare", "--no-dvc")
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert f"MLflow store sqlite:///{db}" in line and "move it aside" in line, line
    assert "Traceback" not in proc.stderr and db.read_bytes() == garbage
    assert not (root / "data/prepared").exists()

    db.unlink()
    assert latentforge(root, "stage", "prepare", "--no-dvc").returncode == 0  # a fresh store
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = latentforge(root, "stage", "prepare", "--no-dvc")
    finally:
        holder.rollback()
        holder.close()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "database is locked" in one_error_line(proc.stderr)


def test_store_errors_mid_run_are_recognised_and_others_are_not():
    """The CLI's last handler turns the store's errors raised after the run opened (a lock
    taken while a stage logs) into the same one line; MLflow's other errors stay as they are."""
    import sqlite3

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from latentforge.tracking import describe_store_error

    locked = sqlalchemy.exc.OperationalError("INSERT INTO metrics ...", {},
                                             sqlite3.OperationalError("database is locked"))
    line = describe_store_error(locked, "sqlite:///p/mlflow.db")
    assert line.startswith("MLflow store sqlite:///p/mlflow.db: (sqlite3.OperationalError) "
                           "database is locked") and "run again once it is done" in line
    assert describe_store_error(MlflowException("Registered Model with name=x not found"),
                                "sqlite:///p/mlflow.db") is None
    assert describe_store_error(ValueError("database is locked"), "u") is None


def test_a_folder_store_is_one_line_saying_what_to_use(tmp_path, monkeypatch):
    """MLflow 3 refuses a file:// (./mlruns) store with a paragraph that the line cut
    mid-URL; it is one line naming the store, the opt-out and the database to use."""
    from mlflow.store.tracking.file_store import FileStore

    from latentforge.tracking import describe_store_error

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(Exception) as refused:
        FileStore(str(tmp_path / "mlruns"))  # MLflow's own refusal, as the client meets it
    uri = (tmp_path / "mlruns").as_uri()
    line = describe_store_error(refused.value, uri)
    assert line is not None and line.startswith(f"MLflow store {uri}: MLflow 3 opens a folder")
    assert "MLFLOW_ALLOW_FILE_STORE=true" in line and "sqlite:///mlflow.db" in line
    assert "mlflow migrate-filestore" in line and "\n" not in line


@pytest.mark.parametrize("value, why", [
    ("''", "prepare: path = '' is empty"),
    (".", "prepare.path = '.' is the project folder or one above it"),
    ("/", "prepare.path = '/' is the project folder or one above it"),
    ("dvc.yaml", "prepare.path = 'dvc.yaml' is dvc.yaml, a file of the project"),
    ("data/prepared", "is data/prepared, an output of the pipeline"),
    ("artifacts/judge/x", "is inside artifacts/judge, an output of the pipeline"),
    ("artifacts", "is a folder that holds artifacts/judge, an output of the pipeline"),
    ("/nonexistent/dir", "prepare.path = '/nonexistent/dir': no such file or folder; the digits "
                         "source does not read it"),
    ("~/images", "prepare.path = '~/images': '~' is not expanded (DVC and the stage read the "
                 "path as written); give '"),
])
def test_a_source_path_dvc_cannot_take_is_refused_before_params_yaml_changes(
        make_project, monkeypatch, capsys, value, why):
    """DVC takes prepare.path as the prepare stage's input: an empty one broke `dvc status`
    for every later run (params.yaml kept it), the others failed inside DVC without naming
    the key."""
    from latentforge.cli import main

    root = make_project(TINY)
    params_before = (root / "params.yaml").read_bytes()
    monkeypatch.chdir(root)
    assert main(["run", "-S", f"prepare.path={value}"]) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err, err
    assert (root / "params.yaml").read_bytes() == params_before
    # A real source folder is fine wherever it is; a missing one (a typo) is refused by key
    # where prepare would run (DVC's own error named neither key nor source), and not where
    # it would not: a deleted input must not stop the stages after it.
    from latentforge.dvcops import check_local_source
    from latentforge.errors import ConfigError

    check_local_source("data/source", "digits")
    (root.parent / "elsewhere").mkdir()
    check_local_source(str(root.parent / "elsewhere"), "folder")
    with pytest.raises(ConfigError, match=r"prepare.path = '.*/nowhere': no such file or folder "
                                          r"\(prepare.source 'folder' reads it"):
        check_local_source(str(root.parent / "nowhere"), "folder")
    check_local_source(str(root.parent / "nowhere"), "folder", prepare_runs=False)


def test_a_broken_link_in_the_source_folder_is_one_line_naming_it(make_project, monkeypatch,
                                                                    capsys, tmp_path):
    """DVC hashes every file under prepare.path; a link whose target is gone failed its status
    with a bare FileNotFoundError naming neither a link nor what to do."""
    from PIL import Image

    from latentforge.cli import main

    source = tmp_path / "images"
    for c in ("a", "b"):
        (source / c).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (8, 8), i * 40).save(source / c / f"{i}.png")
    (source / "a" / "link.png").symlink_to(tmp_path / "gone.png")
    root = make_project(TINY)
    monkeypatch.chdir(root)
    assert main(["run", "-S", "prepare.source=folder", "-S", f"prepare.path={source}"]) == 1
    err = capsys.readouterr().err
    assert f"error: {source / 'a' / 'link.png'}: a symbolic link to {tmp_path / 'gone.png'}, " \
        "which is not there" in err and "remove the link or restore its target" in err, err
    assert "Traceback" not in err


def test_use_gpu_without_a_gpu_here_is_refused_before_any_stage(make_project, monkeypatch,
                                                                 capsys):
    """It was a RuntimeError traceback when the judge stage started, after prepare ran."""
    import torch

    from latentforge.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without one
    root = make_project(TINY)
    params_before = (root / "params.yaml").read_bytes()
    monkeypatch.chdir(root)
    assert main(["run", "-S", "compute.use_gpu=true"]) == 2
    err = capsys.readouterr().err
    assert "error: compute.use_gpu is true but torch sees no CUDA device here" in err, err
    assert "Traceback" not in err and not (root / "data/prepared").exists()
    # Asked only when something will run: `stage prepare` alone needs no GPU.
    assert main(["stage", "prepare", "-S", "compute.use_gpu=true"]) == 0
    assert (root / "data/prepared").exists() and params_before != \
        (root / "params.yaml").read_bytes()


@pytest.mark.parametrize("override, why", [
    ("evaluate.inception_weights=weights/pt_inception.pth",
     "evaluate.inception_weights = 'weights/pt_inception.pth': no such local file"),
    ("rl.rewards={nosuchmod:score: 1.0}",
     "rl.rewards: no module 'nosuchmod' for reward 'nosuchmod:score' in "),
])
def test_a_user_file_a_later_stage_reads_is_looked_at_before_the_first(
        make_project, monkeypatch, capsys, override, why):
    """They failed when evaluate (the last stage) or rl began, after the training stages."""
    from latentforge.cli import main

    root = make_project(TINY)
    monkeypatch.chdir(root)
    assert main(["run", "-S", override]) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err, err
    assert not (root / "data/prepared").exists()
    # A reward module in the project folder is found without being imported.
    (root / "my_rewards.py").write_text("raise SystemExit('imported')\n")
    from latentforge.rewards import check_names

    check_names(["my_rewards:score", "judge_prob"], root)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_or_prefect_server_that_does_not_answer_is_one_line_within_seconds(
        make_project, monkeypatch, capsys):
    """A tracking server that was down meant ~4 min of retries and a 126-line traceback; one
    that never answered, a wait of a quarter hour; a configured Prefect API likewise."""
    import socket
    import time

    from latentforge import prefectserver, tracking
    from latentforge.cli import main
    from latentforge.errors import LatentForgeError

    down = f"http://127.0.0.1:{closed_port()}"
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for url in (down, mute):
            started = time.monotonic()
            with pytest.raises(LatentForgeError, match=rf"MLflow tracking server {url} "
                                                        r"\(MLFLOW_TRACKING_URI\) does not answer"):
                tracking.check_server(url, timeout=1.0)
            with pytest.raises(LatentForgeError, match=rf"PREFECT_API_URL {url} \(from .*\) does "
                                                        r"not answer: .*unset PREFECT_API_URL"):
                prefectserver.check_configured_api(url, timeout=1.0)
            assert time.monotonic() - started < 10
    root = make_project(TINY)
    params_before = (root / "params.yaml").read_bytes()
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert f"error: MLflow tracking server {down} (MLFLOW_TRACKING_URI) does not answer" in err
    assert "Traceback" not in err and (root / "params.yaml").read_bytes() == params_before
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("PREFECT_API_URL", down + "/api")
    assert main(["run", "-S", "tracking.enabled=false"]) == 1
    err = capsys.readouterr().err
    assert f"error: PREFECT_API_URL {down}/api (from the environment) does not answer" in err
    assert not (root / "data/prepared").exists()


def test_the_tracking_server_failing_mid_run_is_one_line(monkeypatch):
    from mlflow.exceptions import MlflowException

    from latentforge.tracking import describe_store_error

    exc = MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/create failed with "
                          "exception HTTPConnectionPool(host='h', port=5000): Max retries "
                          "exceeded with url: ... (Caused by NewConnectionError(...))")
    line = describe_store_error(exc, "http://h:5000")
    assert line == ("MLflow store http://h:5000: API request to http://h:5000/api/2.0/mlflow/"
                    "runs/create failed (the server did not answer); start it or fix "
                    "MLFLOW_TRACKING_URI (or run without tracking: -S tracking.enabled=false)")
    busy = MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/create failed with "
                           "exception HTTPConnectionPool(host='h', port=5000): Max retries "
                           "exceeded with url: ... (Caused by ResponseError('too many 500 error "
                           "responses'))")
    assert "failed (the server answered with errors); see the tracking server's log" in \
        describe_store_error(busy, "http://h:5000")


@pytest.mark.parametrize("status, answers", [(200, True), (401, True), (404, True),
                                             (503, False), (502, False)])
def test_what_counts_as_a_server_answering(status, answers):
    """Any HTTP answer (Prefect Cloud's or an MLflow behind a login may refuse /health) but a
    gateway's 5xx for a server behind it that is down; a user:password@ URL is probed without
    it and shown without the password."""
    import http.server
    import threading

    from latentforge import tracking
    from latentforge.errors import LatentForgeError
    from latentforge.probe import shown_url, unanswered

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://alice:s3cret@127.0.0.1:{server.server_address[1]}/base/"
        assert (unanswered(url, timeout=5) is None) == answers
        assert seen[-1][0] == "/base/health"
        if not answers:
            with pytest.raises(LatentForgeError) as err:
                tracking.check_server(url, timeout=5)
            assert f"HTTP {status}" in str(err.value) and "s3cret" not in str(err.value)
            assert "alice:***@127.0.0.1" in str(err.value)
    finally:
        server.shutdown()
        server.server_close()
    assert shown_url("https://u:p@h/x") == "https://u:***@h/x" and shown_url("http://h") == \
        "http://h"


def test_an_experiment_deleted_in_the_mlflow_ui_is_one_line_saying_what_to_do(tmp_path,
                                                                             monkeypatch):
    import mlflow

    from latentforge import tracking
    from latentforge.config import TrackingConfig
    from latentforge.errors import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(experiment="gone")
    with tracking.start_run(cfg, "prepare", {}, root=tmp_path):
        pass
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    exp_id = client.get_experiment_by_name("gone").experiment_id
    client.delete_experiment(exp_id)
    deleted = (rf"tracking.experiment 'gone' \(id {exp_id}\) was deleted in MLflow: restore it "
               rf"\(`mlflow experiments restore --experiment-id {exp_id}`\)")
    with pytest.raises(ConfigError, match=deleted), \
            tracking.start_run(cfg, "prepare", {}, root=tmp_path):
        pass
