"""Checkpoints that cannot be read back: set aside with a warning naming the file, resumed from
the previous good one (or from scratch), and a state.pt holding pickled code is refused without
running it. Real files, real torch; the training runs are test_training's tiny MLP problem."""

from __future__ import annotations

import builtins
import logging
import os
import shlex
from pathlib import Path

import pytest
import torch
from test_training import assert_same_state, build_mlp, mse_loss, tiny_cfg, toy_data
from torch import nn

from latentforge import checkpoint as ckpt
from latentforge.config import ComputeConfig
from latentforge.errors import DataError
from latentforge.training import TrainSpec, capture_rng, train

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _save(root: Path, step: int) -> Path:
    model = {"w": torch.full((2, 2), float(step)), "b": torch.arange(3)}
    return ckpt.save_checkpoint(root, step, model, dict(model), {"rng": capture_rng()})


def _set_aside(root: Path, step: int) -> list[Path]:
    return sorted(root.glob(f"{ckpt.CORRUPT_PREFIX}{ckpt.step_dir_name(step)}-*"))


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


class RunsCode:
    """Pickles as a call of `func(*args)`: what a hostile state.pt would carry."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


class Plain:
    """A class instance with nothing hostile about it: still not a tensor or plain container."""

    def __init__(self) -> None:
        self.x = 1


def _touch_payloads(marker: Path) -> dict[str, object]:
    return {"os.system": RunsCode(os.system, f"touch {shlex.quote(str(marker))}"),
            "builtins.exec": RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()")}


# --------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from.
# --------------------------------------------------------------------------------------------


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


GARBAGE = b"not a checkpoint file " * 12

DAMAGE = {
    "truncated model": (ckpt.MODEL_FILE, _truncate, "truncated or garbled safetensors file"),
    "garbage ema": (ckpt.EMA_FILE, lambda f: f.write_bytes(GARBAGE), "garbled safetensors"),
    "empty ema": (ckpt.EMA_FILE, lambda f: f.write_bytes(b""), "safetensors file"),
    "truncated state": (ckpt.STATE_FILE, _truncate, "truncated or garbled torch.save file"),
    "empty state": (ckpt.STATE_FILE, lambda f: f.write_bytes(b""), "empty or truncated"),
    "garbage state": (ckpt.STATE_FILE, lambda f: f.write_bytes(GARBAGE), "garbled"),
    "missing state": (ckpt.STATE_FILE, lambda f: f.unlink(), "missing"),
    "state without a step": (ckpt.STATE_FILE, lambda f: torch.save({"rng": 1}, f),
                             "no integer 'step'"),
    "state of another step": (ckpt.STATE_FILE, lambda f: torch.save({"step": 20}, f),
                              "says step 20 but sits in step-000030"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    name, spoil, reason = DAMAGE[damage]
    for step in (10, 20, 30):
        _save(tmp_path, step)
    bad = tmp_path / "step-000030" / name
    spoil(bad)
    left = {f.name: f.read_bytes() for f in bad.parent.iterdir()}
    with pytest.raises(ckpt.CheckpointError, match=reason) as raised:
        ckpt.load_checkpoint(bad.parent)
    assert str(raised.value).startswith(f"{bad}: ") and isinstance(raised.value, DataError)

    resumed = ckpt.find_resume_checkpoint(tmp_path)
    assert resumed is not None and resumed.step == 20
    assert resumed.path == tmp_path / "step-000020"
    assert [s for s, _ in ckpt.committed_steps(tmp_path)] == [10, 20]
    assert (tmp_path / ckpt.LATEST_FILE).read_text().strip() == "step-000020"
    # Moved, not deleted: the folder keeps every file as it was, the spoiled one included.
    [aside] = _set_aside(tmp_path, 30)
    assert {f.name: f.read_bytes() for f in aside.iterdir()} == left
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(bad) in warning.getMessage() and reason in warning.getMessage()
    assert aside.name in warning.getMessage() and "\n" not in warning.getMessage()


def test_when_no_checkpoint_reads_back_there_is_none_to_resume(tmp_path: Path) -> None:
    for step in (10, 20):
        _truncate(_save(tmp_path, step) / ckpt.MODEL_FILE)
    assert ckpt.find_resume_checkpoint(tmp_path) is None
    assert ckpt.committed_steps(tmp_path) == [] and not (tmp_path / ckpt.LATEST_FILE).exists()
    assert len(_set_aside(tmp_path, 10)) == len(_set_aside(tmp_path, 20)) == 1
    # Setting the same step aside again (a rerun that failed the same way) keeps both copies.
    _truncate(_save(tmp_path, 20) / ckpt.MODEL_FILE)
    assert ckpt.find_resume_checkpoint(tmp_path) is None
    assert len(_set_aside(tmp_path, 20)) == 2


def test_load_checkpoint_weights_names_the_unreadable_file(tmp_path: Path) -> None:
    _truncate(_save(tmp_path, 10) / ckpt.EMA_FILE)
    with pytest.raises(ckpt.CheckpointError, match=r"step-000010/ema\.safetensors: truncated"):
        ckpt.load_checkpoint_weights(tmp_path)


# --------------------------------------------------------------------------------------------
# A state.pt holding pickled objects.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "a class instance"])
def test_a_state_file_holding_pickled_objects_is_refused_without_running_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, payload: str) -> None:
    marker = tmp_path / "ran"
    hostile = {**_touch_payloads(marker), "a class instance": Plain()}[payload]
    if payload != "a class instance":  # the payload is live: an unsafe load runs it
        control = tmp_path / "control.pt"
        torch.save(_touch_payloads(tmp_path / "control-ran")[payload], control)
        torch.load(control, weights_only=False)
        assert (tmp_path / "control-ran").exists()

    ckpt_dir = tmp_path / "ckpt"
    _save(ckpt_dir, 10)
    state = _save(ckpt_dir, 20) / ckpt.STATE_FILE
    torch.save({"step": 20, "rng": capture_rng(), "note": hostile}, state)
    with pytest.raises(ckpt.CheckpointError) as raised:
        ckpt.load_checkpoint(state.parent)
    assert "weights_only" not in str(raised.value) and "refused" in str(raised.value)

    resumed = ckpt.find_resume_checkpoint(ckpt_dir)
    assert resumed is not None and resumed.step == 10
    assert not marker.exists()
    [aside] = _set_aside(ckpt_dir, 20)
    assert (aside / ckpt.STATE_FILE).is_file()
    logged = _warnings(caplog)
    assert str(state) in logged and "never loads pickled code" in logged
    assert "weights_only" not in logged and "add_safe_globals" not in logged
    refused = {"os.system": "posix.system", "builtins.exec": "exec",
               "a class instance": "test_checkpoint_failures.Plain"}[payload]
    assert f"it names {refused};" in logged


# --------------------------------------------------------------------------------------------
# Through `train`.
# --------------------------------------------------------------------------------------------


def test_training_resumes_from_the_step_before_a_truncated_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec, cfg = TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg(keep_last=3)
    whole = train(spec, cfg, ComputeConfig(), tmp_path, progress=False)
    bad = tmp_path / "step-000030" / ckpt.MODEL_FILE
    _truncate(bad)
    torn = bad.read_bytes()

    rerun = train(spec, cfg, ComputeConfig(), tmp_path, progress=False)
    assert rerun.resumed_from == 20 and rerun.steps == 30
    assert_same_state(rerun.model_state, whole.model_state)
    assert_same_state(rerun.ema_state, whole.ema_state)
    assert [r["step"] for r in rerun.history] == [5, 10, 15, 20, 25, 30]
    [aside] = _set_aside(tmp_path, 30)
    assert (aside / ckpt.MODEL_FILE).read_bytes() == torn
    assert (tmp_path / ckpt.LATEST_FILE).read_text().strip() == "step-000030"
    assert str(bad) in _warnings(caplog)


def test_training_starts_afresh_when_every_checkpoint_is_unreadable(tmp_path: Path) -> None:
    spec, cfg = TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg()
    whole = train(spec, cfg, ComputeConfig(), tmp_path / "a", progress=False)
    train(spec, cfg, ComputeConfig(), tmp_path / "b", progress=False)
    for _, folder in ckpt.committed_steps(tmp_path / "b"):
        (folder / ckpt.STATE_FILE).write_bytes(b"\x80\x02garbage")
    rerun = train(spec, cfg, ComputeConfig(), tmp_path / "b", progress=False)
    assert rerun.resumed_from == 0 and rerun.steps == 30
    assert_same_state(rerun.ema_state, whole.ema_state)
    assert len(_set_aside(tmp_path / "b", 20)) == len(_set_aside(tmp_path / "b", 30)) == 1
    assert (tmp_path / "b" / ckpt.LATEST_FILE).read_text().strip() == "step-000030"


def test_a_state_file_without_the_optimizer_is_set_aside(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    spec, cfg = TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg()
    whole = train(spec, cfg, ComputeConfig(), tmp_path, progress=False)
    state_file = tmp_path / "step-000030" / ckpt.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["optimizer"]
    torch.save(state, state_file)
    rerun = train(spec, cfg, ComputeConfig(), tmp_path, progress=False)
    assert rerun.resumed_from == 20
    assert_same_state(rerun.ema_state, whole.ema_state)
    assert f"{state_file}: lacks optimizer" in _warnings(caplog)


def build_wider_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def test_checkpoints_that_do_not_fit_the_model_are_set_aside(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another model size under the same training config (the fingerprint holds the config, not
    the code): e.g. a model class changed between versions. Set aside, kept, trained afresh."""
    cfg = tiny_cfg(steps=20)
    train(TrainSpec(build_mlp, mse_loss, toy_data()), cfg, ComputeConfig(), tmp_path,
          progress=False)
    wider = TrainSpec(build_wider_mlp, mse_loss, toy_data())
    rerun = train(wider, cfg, ComputeConfig(), tmp_path, progress=False)
    assert rerun.resumed_from == 0 and rerun.model_state["0.weight"].shape == (32, 8)
    assert len(_set_aside(tmp_path, 10)) == len(_set_aside(tmp_path, 20)) == 1
    assert "does not fit the model ('0.weight' is (16, 8) in the file, (32, 8) in the model)" \
        in _warnings(caplog)


def test_another_configuration_is_still_discarded_not_set_aside(tmp_path: Path) -> None:
    """The fingerprint check comes first: another config's checkpoints are deleted as before."""
    data = toy_data()
    train(TrainSpec(build_mlp, mse_loss, data), tiny_cfg(steps=20), ComputeConfig(), tmp_path,
          progress=False)
    other = train(TrainSpec(build_wider_mlp, mse_loss, data), tiny_cfg(steps=20, lr=5e-3),
                  ComputeConfig(), tmp_path, progress=False)
    assert other.resumed_from == 0
    assert not list(tmp_path.glob(f"{ckpt.CORRUPT_PREFIX}*"))


def test_a_full_disk_while_saving_a_checkpoint_names_the_file() -> None:
    """/dev/full fails every write with ENOSPC, as a full disk does, and names no file: the
    error said "no space left on device: (file not named by the system)"."""
    with pytest.raises(OSError) as err:
        ckpt._write_file_synced(Path("/dev/full"), b"x" * 10)
    assert err.value.errno == 28 and err.value.filename == "/dev/full"
