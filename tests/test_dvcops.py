"""dvcops.reproduce against a real DVC repository: params.yaml edited while a stage runs is not
recorded in dvc.lock as what the stage ran with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from latentforge import dvcops
from latentforge.errors import LatentForgeError

PARAMS = "train:\n  steps: {steps}\n  lr: 0.5\nother: 3\n"
# The stage reads its parameters when it starts; a user then edits params.yaml (here the
# command itself does, while DVC waits for it) before DVC writes dvc.lock.
STAGE = """\
import sys, yaml
from pathlib import Path
steps = yaml.safe_load(Path("params.yaml").read_text())["train"]["steps"]
Path("out.txt").write_text(str(steps))
if len(sys.argv) > 1:
    Path("params.yaml").write_text(Path("params.yaml").read_text().replace(
        f"steps: {steps}", f"steps: {sys.argv[1]}"))
"""


def make_repo(root: Path, edit_to: int | None) -> None:
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True,
                   env=dvcops.dvc_env())
    (root / "params.yaml").write_text(PARAMS.format(steps=1))
    (root / "stage.py").write_text(STAGE)
    cmd = "python stage.py" + (f" {edit_to}" if edit_to is not None else "")
    (root / "dvc.yaml").write_text(
        f"stages:\n  train:\n    cmd: {cmd}\n    deps: [stage.py]\n"
        "    params: [train, other]\n    outs: [out.txt]\n")


def recorded(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]["params"][
        "params.yaml"]


def test_an_edit_during_the_stage_leaves_the_used_values_in_dvc_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # DVC resolves a stage target against the working directory
    make_repo(tmp_path, edit_to=2)
    lines: list[str] = []
    dvcops.reproduce("train", root=tmp_path, on_line=lines.append)
    assert (tmp_path / "out.txt").read_text() == "1"
    assert "steps: 2" in (tmp_path / "params.yaml").read_text()  # the user's edit stays
    assert recorded(tmp_path) == {"train": {"steps": 1, "lr": 0.5}, "other": 3}
    [warning] = [line for line in lines if line.startswith("warning: params.yaml changed")]
    assert "stage 'train'" in warning and "(train)" in warning
    assert dvcops.stage_status("train", root=tmp_path)  # changed: it runs again next time
    # The next run, without an edit, makes the output with the new value and records it.
    (tmp_path / "dvc.yaml").write_text((tmp_path / "dvc.yaml").read_text().replace(
        "python stage.py 2", "python stage.py"))
    dvcops.reproduce("train", root=tmp_path, on_line=lines.append)
    assert (tmp_path / "out.txt").read_text() == "2"
    assert recorded(tmp_path)["train"]["steps"] == 2
    assert not dvcops.stage_status("train", root=tmp_path)


def test_without_an_edit_dvc_lock_is_dvcs_own(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_repo(tmp_path, edit_to=None)
    lines: list[str] = []
    dvcops.reproduce("train", root=tmp_path, on_line=lines.append)
    lock_text = (tmp_path / "dvc.lock").read_text()
    assert recorded(tmp_path) == {"train": {"steps": 1, "lr": 0.5}, "other": 3}
    assert not any(line.startswith("warning: params.yaml") for line in lines)
    # Nothing to correct when asked with the same text: the lock is not rewritten.
    assert dvcops.record_params_used("train", (tmp_path / "params.yaml").read_bytes(),
                                     tmp_path) == []
    assert (tmp_path / "dvc.lock").read_text() == lock_text


# The stage command as `latentforge stage` runs under `latentforge run`: it keeps the bytes it
# read (paths.params_read_file). Here the user's edit lands after DVC started, before the read.
STAGE_READS_LATE = """\
import sys
from pathlib import Path
p = Path("params.yaml")
p.write_text(p.read_text().replace("steps: 1", "steps: 2"))  # the edit, before the stage reads
text = p.read_bytes()
Path(".latentforge/last").mkdir(parents=True, exist_ok=True)
Path(".latentforge/last/train.params.yaml").write_bytes(text)
Path("out.txt").write_text(text.decode().split("steps: ")[1].split()[0])
if len(sys.argv) > 1:
    p.write_text("train: [unclosed\\n")  # saved half-way through typing, while DVC waits
"""


def test_an_edit_before_the_stage_read_its_parameters_is_what_dvc_lock_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The values recorded are the ones the stage read: dvc.lock used to get the file as it was
    before DVC started, so an output made with steps 2 was locked as made with steps 1 (and,
    with the edit undone, called up to date)."""
    monkeypatch.chdir(tmp_path)
    make_repo(tmp_path, edit_to=None)
    (tmp_path / "stage.py").write_text(STAGE_READS_LATE)
    lines: list[str] = []
    dvcops.reproduce("train", root=tmp_path, on_line=lines.append)
    assert (tmp_path / "out.txt").read_text() == "2"
    assert recorded(tmp_path) == {"train": {"steps": 2, "lr": 0.5}, "other": 3}
    assert not any(line.startswith("warning: params.yaml") for line in lines)
    assert not dvcops.stage_status("train", root=tmp_path)
    # params.yaml left unreadable while the stage ran: DVC cannot record it, and the error
    # says so first (it read as the stage failing).
    (tmp_path / "dvc.yaml").write_text((tmp_path / "dvc.yaml").read_text().replace(
        "python stage.py", "python stage.py garble"))
    (tmp_path / "params.yaml").write_text(PARAMS.format(steps=1))
    with pytest.raises(LatentForgeError) as err:
        dvcops.reproduce("train", root=tmp_path, on_line=lines.append)
    assert str(err.value).startswith(f"{tmp_path / 'params.yaml'} changed while stage 'train' "
                                     "ran and can no longer be read (")
    assert "fix params.yaml and run again" in str(err.value)


def test_push_writes_the_storage_timeouts_into_the_s3_remote(tmp_path, s3_bucket):
    """dvc push (and a teammate's dvc pull) use DVC's own S3 client: the remote carries
    storage.connect_timeout/read_timeout, whole seconds rounded up, so neither waits on a
    silent endpoint at botocore's defaults."""
    import configparser

    from conftest import dvc_repo

    root = dvc_repo(tmp_path / "p", {"data.bin": b"x" * 1000})
    lines: list[str] = []
    dvcops.push(f"s3://{s3_bucket}/dvc", root, on_line=lines.append, timeouts=(5, 2.5))
    config = configparser.ConfigParser(strict=False)
    config.read(root / ".dvc" / "config")
    remote = config['\'remote "storage"\'']
    assert (remote["url"], remote["connect_timeout"], remote["read_timeout"]) == (
        f"s3://{s3_bucket}/dvc", "5", "3")
    from latentforge import storage

    assert storage.list_files(f"s3://{s3_bucket}/dvc")  # it pushed
    assert not [line for line in lines if "dvc pull" in line]  # no metrics: nothing to say

    # The metrics and plots files are git's (cache: false): the remote never gets them, and a
    # teammate's clone + `dvc pull` without them reran every stage. The push says so.
    (root / "metrics").mkdir()
    (root / "metrics" / "judge.json").write_text("{}\n")
    lines.clear()
    dvcops.push(f"s3://{s3_bucket}/dvc", root, on_line=lines.append, timeouts=(5, 2.5))
    (warned,) = [line for line in lines if "dvc pull" in line]
    assert warned.startswith("WARNING: not in git: metrics/judge.json: a clone that runs `dvc "
                             f"pull` from s3://{s3_bucket}/dvc gets the cached outputs but not "
                             "these"), warned


def test_a_remote_dvc_refuses_is_one_line_with_dvcs_reason(tmp_path):
    """`dvc remote add` failing (a URL DVC cannot use, or a broken .dvc/config) was a
    CalledProcessError traceback with DVC's reason dropped."""
    from conftest import dvc_repo

    from latentforge.errors import LatentForgeError

    root = dvc_repo(tmp_path / "p", {"data.bin": b"x"})
    (root / ".dvc" / "config").write_text("[core\n")  # not INI
    with pytest.raises(LatentForgeError, match=r"storage.remote '/tmp/r': `dvc remote add` "
                                               r"failed: ERROR: .*config"):
        dvcops.push("/tmp/r", root, on_line=lambda _: None)


def test_a_remote_of_a_kind_dvc_here_cannot_use_is_refused_when_params_load():
    from latentforge import preflight
    from latentforge.config import build_params
    from latentforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"storage: remote = 'foo://bar': DVC has no foo:// "
                                          r"remotes; expected a local path or a URL starting "
                                          r"one of s3://, gs://"):
        build_params({"storage": {"remote": "foo://bar"}})
    for good in ("s3://b/dvc", "/srv/dvc", "../dvc-store", "gs://b/dvc"):
        assert build_params({"storage": {"remote": good}}).storage.remote == good
    # A kind DVC has, whose plugin is not installed here: said before the run, not after it.
    with pytest.raises(ConfigError, match=r"storage.remote = 'gs://b/dvc': DVC's gs:// remotes "
                                          r"need `pip install dvc-gs`"):
        preflight.check_params(build_params({"storage": {"remote": "gs://b/dvc"}}),
                               ["judge"])
    with pytest.raises(ConfigError, match="tracking: experiment = '  ' is empty"):
        build_params({"tracking": {"experiment": "  "}})


# 30 distinct frames (Python folds a frame repeated by recursion into one line).
DEEP_CRASH = "import zlib\n\ndef f0():\n    zlib.decompress(b'not deflate data')\n" + "".join(
    f"\ndef f{i}():\n    f{i - 1}()\n" for i in range(1, 30)) + "\nf29()\n"


def test_a_stage_dying_deep_in_its_stack_is_named_by_its_exception(tmp_path):
    """A real traceback is longer than the lines the message shows: the cause still comes
    from its end, whatever the exception is called (zlib.error is neither *Error nor
    *Exception)."""
    from conftest import dvc_repo

    from latentforge.errors import LatentForgeError

    root = dvc_repo(tmp_path / "p")
    (root / "crash.py").write_text(DEEP_CRASH)
    (root / "dvc.yaml").write_text(f"stages:\n  crash:\n    cmd: {sys.executable} crash.py\n"
                                   "    deps: [crash.py]\n    outs: [never]\n")
    with pytest.raises(LatentForgeError) as err:
        dvcops.run_dvc(["repro"], root=root, what="stage crash", on_line=lambda line: None)
    first = str(err.value).splitlines()[0]
    assert first.startswith("stage crash failed (dvc repro exit ") and first.endswith(
        "): zlib.error: Error -3 while decompressing data: incorrect header check; last "
        "output:"), first
    assert len(str(err.value).splitlines()) == 1 + dvcops.SHOWN_LINES


def test_values_yaml_1_1_reads_otherwise_are_not_corrected(tmp_path: Path) -> None:
    """DVC records `name: on` as the string 'on' (YAML 1.2), as the stage reads it: PyYAML's
    YAML 1.1 True would be written into dvc.lock and the stage would rerun every time."""
    params = "train:\n  name: on\n  when: 1:30\n  code: 017\n  lr: 2e-3\n"
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: python stage.py\n    params:\n"
        "      params.yaml:\n        train.name: on\n        train.when: 1:30\n"
        "        train.code: 017\n        train.lr: 2e-3\n")
    lock_text = (tmp_path / "dvc.lock").read_text()
    assert dvcops.record_params_used("train", params.encode(), tmp_path) == []
    assert (tmp_path / "dvc.lock").read_text() == lock_text


def test_a_stage_run_alone_on_out_of_date_inputs_says_so(caplog):
    """`latentforge stage evaluate -S generator.cfg_scale=2` runs evaluate on the generator
    as it is (DVC's --single-item): a warning names the stages DVC finds out of date."""
    from latentforge.cli import warn_stale_upstream
    from latentforge.dvcops import GraphStatus

    order = ["prepare", "generator", "posttrain", "evaluate", "other"]
    status = GraphStatus(order, {"prepare": frozenset(), "generator": frozenset({"prepare"}),
                                 "posttrain": frozenset({"prepare", "generator"}),
                                 "evaluate": frozenset({"prepare", "generator", "posttrain"}),
                                 "other": frozenset()},
                         frozenset({"generator", "posttrain", "other"}))
    with caplog.at_level("WARNING"):
        assert warn_stale_upstream("evaluate", status) == ["generator", "posttrain"]
    assert ("evaluate runs on what the outputs of generator and posttrain hold now, and DVC "
            "finds them out of date: `latentforge run` brings the chain up to date") in caplog.text
    caplog.clear()
    assert warn_stale_upstream("prepare", status) == [] and caplog.text == ""
