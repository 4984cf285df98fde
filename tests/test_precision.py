"""compute.precision auto: the per-machine matmul check, the per-model step timing, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentforge import precision

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path))
    return tmp_path / precision.CACHE_FILE


def not_called(*args: object, **kwargs: object) -> float:
    raise AssertionError("measured again instead of reading the cache")


def no_step() -> None:
    raise AssertionError("timed a training step")


def test_cache_path_follows_the_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LATENTFORGE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert precision.cache_path() == tmp_path / "xdg" / "latentforge" / "precision.json"
    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path / "own"))
    assert precision.cache_path() == tmp_path / "own" / "precision.json"


def test_the_machine_key_names_the_cpu_torch_and_threads() -> None:
    key = precision.machine_key(CPU)
    assert key.startswith("cpu ") and torch.__version__ in key
    assert f"{torch.get_num_threads()} threads" in key


def test_fp32_without_timing_a_step_where_bf16_matmuls_are_not_faster(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "matmul_speedup", lambda device: 0.5)
    assert precision.choose_precision(CPU, "model a", no_step) == "fp32"
    record = json.loads(cache.read_text())[precision.machine_key(CPU)]
    assert record["matmul_bf16_speedup"] == 0.5
    monkeypatch.setattr(precision, "matmul_speedup", not_called)  # once per machine
    assert precision.choose_precision(CPU, "model b", no_step) == "fp32"


def test_bf16_only_where_its_step_is_clearly_faster_measured_once_per_model(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "matmul_speedup", lambda device: 4.0)
    timings = {"fast in bf16": {"fp32": 2.0, "bf16": 1.0},
               "slow in bf16": {"fp32": 1.0, "bf16": 2.0},
               "within noise": {"fp32": 1.0, "bf16": 0.95}}
    chosen = {}
    for workload, seconds in timings.items():
        monkeypatch.setattr(precision, "time_steps", lambda step, device, s=seconds: s)
        chosen[workload] = precision.choose_precision(CPU, workload, lambda: lambda bf16: None)
    assert chosen == {"fast in bf16": "bf16", "slow in bf16": "fp32", "within noise": "fp32"}
    assert json.loads(cache.read_text())[precision.machine_key(CPU)][precision.STEPS_KEY] == timings
    monkeypatch.setattr(precision, "time_steps", not_called)
    monkeypatch.setattr(precision, "matmul_speedup", not_called)
    assert precision.choose_precision(CPU, "fast in bf16", no_step) == "bf16"


def test_step_timings_from_before_the_fp32_attention_are_timed_again(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache written before models/layers.py recorded bf16 steps slowed by bf16 attention.
    machine = precision.machine_key(CPU)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({machine: {"matmul_bf16_speedup": 4.0,
                                           "steps": {"m": {"fp32": 1.0, "bf16": 2.0}}}}))
    monkeypatch.setattr(precision, "time_steps",
                        lambda step, device: {"fp32": 2.0, "bf16": 1.0})
    assert precision.choose_precision(CPU, "m", lambda: lambda bf16: None) == "bf16"
    record = json.loads(cache.read_text())[machine]
    assert record[precision.STEPS_KEY] == {"m": {"fp32": 2.0, "bf16": 1.0}}


def test_time_steps_alternates_the_precisions_after_a_warm_up_each() -> None:
    calls: list[bool] = []
    seconds = precision.time_steps(calls.append, CPU, rounds=2, per_round=1)
    assert calls == [False, True, False, True, False, True]
    assert set(seconds) == {"fp32", "bf16"} and all(s >= 0 for s in seconds.values())


def test_matmul_speedup_measures_a_ratio() -> None:
    assert precision.matmul_speedup(CPU, n=64, reps=1) > 0


def test_an_unreadable_cache_is_measured_again(cache: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cache.write_text("{not json")
    monkeypatch.setattr(precision, "matmul_speedup", lambda device: 0.5)
    assert precision.choose_precision(CPU, "model", no_step) == "fp32"
    assert json.loads(cache.read_text())[precision.machine_key(CPU)]["matmul_bf16_speedup"] == 0.5
