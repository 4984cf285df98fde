"""The shared training harness: schedule, EMA, clipping, checkpoints, resume, Ray workers."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_rounding_close
from torch import nn

from latentforge import checkpoint as ckpt
from latentforge import training
from latentforge.config import ComputeConfig, TrainConfig
from latentforge.tracking import Tracker
from latentforge.training import (
    EMA,
    GlobalBatchSampler,
    LossFn,
    TrainSpec,
    build_optimizer,
    capture_rng,
    clip_gradients,
    default_collate,
    load_optimizer_state,
    lr_at,
    restore_rng,
    seed_step,
    train,
)

# --------------------------------------------------------------------------------------------
# A tiny problem: an MLP regressing a fixed function of random inputs.
# --------------------------------------------------------------------------------------------


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def mse_loss(model: nn.Module, batch: dict[str, torch.Tensor],
             step: int) -> tuple[torch.Tensor, dict[str, float]]:
    pred = model(batch["x"]).squeeze(-1)
    return F.mse_loss(pred, batch["y"]), {"mae": (pred - batch["y"]).abs().mean()}


def toy_data(n: int = 96) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return {"x": x, "y": np.tanh(x[:, :4].sum(1) - x[:, 4:].sum(1)).astype(np.float32)}


class WithAnOptionalPart(nn.Module):
    """An MLP with a parameter only some options use (like the tokenizer's mask token)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = build_mlp()
        self.unused = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def tiny_cfg(**overrides: object) -> TrainConfig:
    base = dict(steps=30, batch_size=16, lr=1e-2, warmup_steps=5, min_lr_ratio=0.1,
                save_every=10, keep_last=2, log_every=5, ema_decay=0.9, grad_clip=1.0, seed=3)
    return TrainConfig(**{**base, **overrides})


class CrashAt:
    """A loss that raises once at `step`, like a process dying mid-run."""

    def __init__(self, step: int, loss: LossFn | None = None) -> None:
        self.step, self.armed = step, True
        self.loss = loss or mse_loss

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int):
        if self.armed and step == self.step:
            self.armed = False
            raise RuntimeError("simulated crash")
        return self.loss(model, batch, step)


class RecordingTracker(Tracker):
    def __init__(self) -> None:
        self.rows: list[tuple[int | None, dict[str, float]]] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **({"rtol": 0, "atol": 0} | tol), msg=key)


def _untimed(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


# --------------------------------------------------------------------------------------------
# Pieces of an update.
# --------------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = tiny_cfg(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # warm-up end: the peak
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)  # final step: lr * min_lr_ratio
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_ema_update_matches_hand_computation() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    w1 = model.weight.detach().clone()
    torch.testing.assert_close(ema.state_dict()["weight"], 0.9 * w0 + 0.1 * w1)
    with torch.no_grad():
        model.weight.mul_(-2.0)
    ema.update()
    expected = 0.9 * (0.9 * w0 + 0.1 * w1) + 0.1 * model.weight.detach()
    torch.testing.assert_close(ema.state_dict()["weight"], expected)

    off = EMA(model, decay=0.0)  # decay 0: the EMA is the model itself
    off.update()
    torch.testing.assert_close(off.state_dict()["weight"], model.weight.detach())


def test_clip_gradients_caps_the_global_norm() -> None:
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.full((3,), 2.0)
    params[1].grad = torch.full((4,), 2.0)
    before = math.sqrt(7 * 4.0)
    assert clip_gradients(params, 1.0).item() == pytest.approx(before)  # the norm before clipping
    total = torch.linalg.vector_norm(torch.cat([p.grad for p in params]))
    assert total.item() == pytest.approx(1.0, rel=1e-5)

    params[0].grad = torch.full((3,), 2.0)
    params[1].grad = torch.full((4,), 2.0)
    assert clip_gradients(params, 0.0).item() == pytest.approx(before)  # 0: off, norm reported
    assert params[0].grad[0].item() == 2.0


def test_global_batches_do_not_depend_on_the_worker_count() -> None:
    sampler = GlobalBatchSampler(num_examples=10, batch_size=4, seed=0)
    for step in (1, 3, 7):
        whole = sampler.global_indices(step)
        halves = [sampler.rank_indices(step, r, 2) for r in range(2)]
        assert sorted(np.concatenate(halves)) == sorted(whole)
        assert np.array_equal(halves[0], np.sort(whole[:2]))
    # Five batches of four cover two epochs: each example exactly twice.
    seen = np.concatenate([sampler.global_indices(s) for s in range(1, 6)])
    assert np.bincount(seen, minlength=10).tolist() == [2] * 10


def test_default_collate_makes_float_images_in_minus_one_one() -> None:
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[0, :, :, 1] = 255
    batch = default_collate({"images": images, "labels": np.array([3, 7])}, torch.device("cpu"))
    assert batch["images"].shape == (2, 3, 4, 5) and batch["images"].dtype == torch.float32
    assert batch["images"][0, 1].eq(1.0).all() and batch["images"][0, 0].eq(-1.0).all()
    assert batch["labels"].tolist() == [3, 7]


def test_ray_workers_reopen_a_memmap_from_its_file_only_on_the_drivers_node(
        ray_local, tmp_path: Path) -> None:  # noqa: F811
    from latentforge.training import _open_array, _share_array

    array = np.arange(60, dtype=np.int16).reshape(10, 6)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    handle = _share_array(mapped, same_node=True)
    assert handle[0] == "memmap"  # a file name and offset travel, not the bytes
    assert np.array_equal(_open_array(handle), array)
    # A cluster's node does not see this disk: the bytes go through the object store.
    handle = _share_array(mapped, same_node=False)
    assert handle[0] == "ref" and str(tmp_path) not in repr(handle)
    assert np.array_equal(_open_array(handle), array)


# --------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------


def _save(root: Path, step: int, keep_last: int | None = None) -> Path:
    model = {"w": torch.full((2, 2), float(step)), "b": torch.arange(3)}
    ema = {"w": torch.full((2, 2), step / 2), "b": torch.arange(3)}
    return ckpt.save_checkpoint(root, step, model, ema, {"rng": capture_rng(), "note": "x"},
                                keep_last=keep_last)


def test_checkpoint_round_trip_with_rng_states(tmp_path: Path) -> None:
    np.random.seed(5)
    path = _save(tmp_path, 7)
    expected = (torch.rand(3), np.random.rand(2), random.random())
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 7 and loaded.train_state["note"] == "x"
    assert torch.equal(loaded.model_state["w"], torch.full((2, 2), 7.0))
    assert torch.equal(loaded.ema_state["w"], torch.full((2, 2), 3.5))
    restore_rng(loaded.train_state["rng"])
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]
    assert (tmp_path / ckpt.LATEST_FILE).read_text().strip() == "step-000007"
    assert torch.equal(ckpt.load_checkpoint_weights(tmp_path, "model")["w"], loaded.model_state["w"])


def test_keep_last_prunes_and_a_partial_save_is_ignored_and_cleaned(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.committed_steps(tmp_path)] == [30, 40]
    # A save killed half-way: a temp folder with one of three files.
    partial = tmp_path / ".step-000050.tmp-deadbeef"
    partial.mkdir()
    (partial / ckpt.MODEL_FILE).write_bytes(b"torn")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-000040"
    assert ckpt.clean_partial(tmp_path) == [partial]
    assert not partial.exists()


# --------------------------------------------------------------------------------------------
# Training runs in-process.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path, precision: str) -> None:
    cfg = tiny_cfg()
    data = toy_data()
    compute = ComputeConfig(precision=precision)
    whole = train(TrainSpec(build_mlp, mse_loss, data), cfg, compute, tmp_path / "a",
                  progress=False)
    assert whole.precision == precision
    assert whole.resumed_from == 0 and whole.steps == 30
    assert [r["step"] for r in whole.history] == [5, 10, 15, 20, 25, 30]
    assert whole.history[-1]["loss"] < whole.history[0]["loss"]

    crashing = TrainSpec(build_mlp, CrashAt(25), data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing, cfg, compute, tmp_path / "b", progress=False)
    assert [s for s, _ in ckpt.committed_steps(tmp_path / "b")] == [10, 20]
    tracker = RecordingTracker()
    resumed = train(crashing, cfg, compute, tmp_path / "b", tracker=tracker, progress=False)
    assert resumed.resumed_from == 20
    assert_same_state(resumed.model_state, whole.model_state)
    assert_same_state(resumed.ema_state, whole.ema_state)
    # The crashed attempt's rows after step 20 are gone; the redone ones match (timing aside).
    assert _untimed(resumed.history) == _untimed(whole.history)
    assert [s for s, _ in tracker.rows] == [5, 10, 15, 20, 25, 30]
    assert {"loss", "lr", "grad_norm", "images_per_s", "mae"} <= tracker.rows[-1][1].keys()

    # Finished: returns at once with the saved weights.
    again = train(crashing, cfg, compute, tmp_path / "b", progress=False)
    assert again.resumed_from == 30
    assert_same_state(again.ema_state, whole.ema_state)
    # Another configuration does not resume these checkpoints.
    other = train(crashing, dataclasses.replace(cfg, lr=5e-3, steps=10), compute,
                  tmp_path / "b", progress=False)
    assert other.resumed_from == 0 and other.steps == 10


def reference_run(spec: TrainSpec, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor],
                                                                dict[str, torch.Tensor]]:
    """The loop's arithmetic written out plainly: AdamW's per-tensor loop, a lerp_ per EMA
    tensor. Returns (model state, EMA state) after cfg.steps updates."""
    torch.manual_seed(cfg.seed)
    model = spec.build_model()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  foreach=False)
    sampler = GlobalBatchSampler(len(spec.data["x"]), cfg.batch_size, cfg.seed)
    for step in range(1, cfg.steps + 1):
        seed_step(cfg.seed, step, 0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = sampler.rank_indices(step, 0, 1)
        batch = default_collate({k: v[idx] for k, v in spec.data.items()}, torch.device("cpu"))
        loss, _ = spec.loss_fn(model, batch, step)
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(model.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for key, value in model.state_dict().items():
                ema[key].lerp_(value, 1.0 - cfg.ema_decay)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, ema


def test_fused_adamw_and_foreach_ema_follow_the_plain_reference_loop(tmp_path: Path) -> None:
    spec, cfg = TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg(steps=20)
    result = train(spec, cfg, ComputeConfig(), tmp_path, progress=False)
    model_state, ema_state = reference_run(spec, cfg)
    for key in model_state:  # fused AdamW rounds differently (1 ulp per update), not more
        assert_rounding_close(result.model_state[key], model_state[key], what=key)
        assert_rounding_close(result.ema_state[key], ema_state[key], what=f"ema {key}")


def test_a_loaded_optimizer_state_keeps_the_fused_kernel() -> None:
    """load_state_dict takes fused/foreach from the saved groups: a run resumed from a
    checkpoint of a per-tensor AdamW must still step fused, as the uninterrupted run does."""
    model = build_mlp()
    loop = torch.optim.AdamW(model.parameters(), foreach=False)
    model(torch.randn(2, 8)).sum().backward()
    loop.step()
    fused = build_optimizer(model, tiny_cfg())
    assert fused.defaults["fused"] is True  # the CPU has the kernel (torch >= 2.4)
    load_optimizer_state(fused, loop.state_dict())
    assert all(g["fused"] is True for g in fused.param_groups)
    torch.testing.assert_close(fused.state[model[0].weight]["exp_avg"],
                               loop.state[model[0].weight]["exp_avg"], rtol=0, atol=0)


def test_precision_comes_from_compute_or_the_stage_and_splits_checkpoints(
        tmp_path: Path) -> None:
    spec, cfg = TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg(steps=10)
    bf16 = train(spec, cfg, ComputeConfig(precision="bf16"), tmp_path, progress=False)
    assert bf16.training_meta() == {"precision": "bf16", "compile": False,
                                    **training.loop_numerics(torch.device("cpu"))}
    # The stage's own bf16 flag is the same run: its checkpoint is the finished run.
    again = train(spec, dataclasses.replace(cfg, bf16=True), ComputeConfig(), tmp_path,
                  progress=False)
    assert again.precision == "bf16" and again.resumed_from == 10
    # An fp32 run does not resume bf16 checkpoints (nor the other way round).
    fp32 = train(spec, cfg, ComputeConfig(), tmp_path, progress=False)
    assert fp32.precision == "fp32" and fp32.resumed_from == 0


def test_a_finished_run_of_other_code_is_trained_anew(tmp_path: Path) -> None:
    """DVC reruns a stage whose code changed; its checkpoints (same config, same data) must then
    not be handed back as the finished result, or a fixed model or loss never takes effect."""
    spec, cfg = TrainSpec(build_mlp, mse_loss, toy_data(), code="a" * 64), tiny_cfg(steps=10)
    first = train(spec, cfg, ComputeConfig(), tmp_path, progress=False)
    assert first.resumed_from == 0
    finished = train(spec, cfg, ComputeConfig(), tmp_path, progress=False)
    assert finished.resumed_from == 10
    # nothing trained the second time: the meta still says how the weights were trained
    assert finished.training_meta() == first.training_meta() and first.numerics
    changed = dataclasses.replace(spec, code="b" * 64)
    again = train(changed, cfg, ComputeConfig(), tmp_path, progress=False)
    assert again.resumed_from == 0 and again.steps == 10


def test_stage_code_digests_follow_the_files_dvc_watches(tmp_path: Path, monkeypatch) -> None:
    from latentforge import paths

    root = Path(__file__).resolve().parents[1]
    for stage, spec in paths.STAGES.items():  # the files DVC watches are the ones imported
        for rel in spec.code:
            assert paths.source_file(rel).resolve() == (root / rel).resolve(), (stage, rel)
    digests = {stage: paths.code_sha256(stage) for stage in paths.STAGES}
    assert len(set(digests.values())) == len(digests)  # every stage reads its own set of files
    # models/layers.py changed: the stages that list it, and only those, get a new digest
    changed_copy = tmp_path / "layers.py"
    changed_copy.write_bytes(paths.source_file("models/layers.py").read_bytes() + b"# a change\n")
    real = paths.source_file
    monkeypatch.setattr(paths, "source_file",
                        lambda rel: changed_copy if rel == "models/layers.py" else real(rel))
    fresh = {stage: paths.code_sha256.__wrapped__(stage) for stage in paths.STAGES}
    assert {s for s in fresh if fresh[s] != digests[s]} == {
        s for s, spec in paths.STAGES.items() if "models/layers.py" in spec.code}


def test_a_workspace_whose_code_is_not_the_code_that_runs_is_named(tmp_path: Path,
                                                                    caplog) -> None:
    """A non-editable install runs its own copy while DVC hashes the workspace's files: the
    run's tags say which differ, and a warning says how to run the workspace's code."""
    from latentforge import paths, runner

    repo = Path(__file__).resolve().parents[1]
    code = paths.STAGES["judge"].code
    tag, differs = "latentforge.code_sha256", "latentforge.code_differs_from_workspace"
    assert runner.code_tags("judge", repo) == {tag: paths.code_sha256("judge")}
    assert runner.code_tags("judge", tmp_path) == {tag: paths.code_sha256("judge")}  # no code
    for rel in code:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((repo / rel).read_bytes())
    assert runner.code_tags("judge", tmp_path) == {tag: paths.code_sha256("judge")}
    with (tmp_path / "tasks/judge.py").open("a") as f:
        f.write("# an edit the installed copy does not have\n")
    with caplog.at_level("WARNING", logger="latentforge.runner"):
        tags = runner.code_tags("judge", tmp_path)
    assert tags == {tag: paths.code_sha256("judge"), differs: "tasks/judge.py"}
    assert "the workspace's tasks/judge.py differ from the code this process runs" in caplog.text
    assert "pip install -e ." in caplog.text


def test_auto_precision_that_picks_fp32_trains_exactly_as_fp32(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from latentforge import precision

    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "matmul_speedup", lambda device: 0.5)  # no faster bf16
    spec, cfg = TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg(steps=10)
    auto = train(spec, cfg, ComputeConfig(precision="auto"), tmp_path / "auto", progress=False)
    fp32 = train(spec, cfg, ComputeConfig(), tmp_path / "fp32", progress=False)
    assert auto.precision == "fp32"
    assert_same_state(auto.model_state, fp32.model_state)
    assert_same_state(auto.ema_state, fp32.ema_state)


class CompilableMLP(nn.Module):
    """build_mlp as a module of its own: nn.Module.compile() on a bare nn.Sequential compiles
    nothing (dynamo skips torch.nn's own frames); the models in models/ are like this one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.slow  # compiling takes ~30 s here
def test_compiled_training_follows_eager_and_resumes_exactly(tmp_path: Path) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg, data = tiny_cfg(steps=20), toy_data()
    eager = train(TrainSpec(CompilableMLP, mse_loss, data), cfg, ComputeConfig(), tmp_path / "a",
                  progress=False)
    torch._dynamo.reset()
    counters.clear()
    compute = ComputeConfig(compile=True)
    compiled = train(TrainSpec(CompilableMLP, mse_loss, data), cfg, compute, tmp_path / "b",
                     progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # compiled indeed, not skipped
    assert compiled.training_meta() == {"precision": "fp32", "compile": True,
                                        **training.loop_numerics(torch.device("cpu"))}
    for key in eager.model_state:  # inductor fuses, so sums round in other orders
        assert_rounding_close(compiled.model_state[key], eager.model_state[key], what=key)
    crashing = TrainSpec(CompilableMLP, CrashAt(15), data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing, cfg, compute, tmp_path / "c", progress=False)
    resumed = train(crashing, cfg, compute, tmp_path / "c", progress=False)
    assert resumed.resumed_from == 10
    assert_same_state(resumed.model_state, compiled.model_state)
    assert_same_state(resumed.ema_state, compiled.ema_state)


def test_auto_precision_times_the_stage_model_once_and_caches_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from latentforge import precision
    from latentforge.training import _choose_precision_on_worker

    monkeypatch.setenv("LATENTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "matmul_speedup", lambda device: 4.0)  # bf16 might pay
    spec, cfg = TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg(steps=5)
    result = train(spec, cfg, ComputeConfig(precision="auto"), tmp_path / "run", progress=False)
    record = json.loads((tmp_path / "cache" / "precision.json").read_text())
    [(workload, seconds)] = record[precision.machine_key(torch.device("cpu"))][precision.STEPS_KEY].items()
    assert "Sequential 161 params, batch 16" in workload
    assert result.precision == ("bf16" if seconds["fp32"] >= 1.1 * seconds["bf16"] else "fp32")
    # The Ray task's side reads the same cache on its machine (here: this one).
    monkeypatch.setattr(precision, "time_steps", lambda *a, **k: pytest.fail("timed again"))
    assert _choose_precision_on_worker(spec, cfg, 16, torch.get_num_threads(),
                                       False) == result.precision


def mean_abs_output(model: nn.Module, step: int) -> dict[str, float]:
    return {"mean_abs_out": float(model(torch.ones(4, 8)).abs().mean()), "noise": float(torch.randn(()))}


def test_periodic_evaluation_reports_rows_and_leaves_training_unchanged(tmp_path: Path) -> None:
    cfg, data = tiny_cfg(), toy_data()
    plain = train(TrainSpec(build_mlp, mse_loss, data), cfg, ComputeConfig(), tmp_path / "a",
                  progress=False)
    tracker = RecordingTracker()
    spec = TrainSpec(build_mlp, mse_loss, data, evaluate=mean_abs_output, eval_every=10)
    evaluated = train(spec, cfg, ComputeConfig(), tmp_path / "b", tracker=tracker, progress=False)
    assert_same_state(evaluated.ema_state, plain.ema_state)
    eval_rows = [(s, m) for s, m in tracker.rows if "eval/mean_abs_out" in m]
    assert [s for s, _ in eval_rows] == [10, 20]  # not at the last step
    assert eval_rows[0][1]["eval/mean_abs_out"] != eval_rows[1][1]["eval/mean_abs_out"]


def test_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path: Path) -> None:
    result = train(TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg(steps=10, bf16=True),
                   ComputeConfig(), tmp_path, progress=False)
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert all(v.dtype == torch.float32 for v in result.ema_state.values())


def build_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GELU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))


def cross_entropy_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                       step: int) -> tuple[torch.Tensor, dict[str, float]]:
    # Dropout-like noise from the global generator, which the harness seeds per step.
    noisy = batch["images"] + 0.05 * torch.randn_like(batch["images"])
    logits = model(noisy)
    accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
    return F.cross_entropy(logits.float(), batch["labels"]), {"accuracy": accuracy}


def digit_like_data(n: int = 256) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 64, (n, 8, 8, 1), dtype=np.uint8)
    images[np.arange(n), labels % 8, :, 0] = 255  # a learnable class signal
    return {"images": images, "labels": labels.astype(np.int64)}


@pytest.mark.gpu
def test_cuda_bf16_training_of_uint8_images_resumes_exactly(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = tiny_cfg(steps=60, batch_size=64, lr=3e-3, save_every=20, log_every=20, bf16=True)
    compute = ComputeConfig(use_gpu=True)
    whole = train(TrainSpec(build_convnet, cross_entropy_loss, digit_like_data()), cfg, compute,
                  tmp_path / "a", progress=False)
    assert whole.history[-1]["accuracy"] > 0.5
    crashing = TrainSpec(build_convnet, CrashAt(50, cross_entropy_loss), digit_like_data())
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing, cfg, compute, tmp_path / "b", progress=False)
    resumed = train(crashing, cfg, compute, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 40
    assert_same_state(resumed.ema_state, whole.ema_state)
    assert_same_state(resumed.model_state, whole.model_state)


KILL_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import numpy as np, torch
    from torch import nn
    from latentforge.config import ComputeConfig, TrainConfig
    from latentforge.training import TrainSpec, train

    torch.set_num_threads(1)
    SLEEP, PRECISION = float(sys.argv[2]), sys.argv[3]

    def build():
        return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def loss_fn(model, batch, step):
        time.sleep(SLEEP)  # slow enough to be killed mid-run
        noise = 0.01 * torch.randn_like(batch["y"])  # randomness in the loss, too
        return ((model(batch["x"]).squeeze(-1) - batch["y"] - noise) ** 2).mean(), {}

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    data = {"x": x, "y": np.sin(x.sum(1)).astype(np.float32)}
    cfg = TrainConfig(steps=200, batch_size=20, lr=3e-3, warmup_steps=10, save_every=20,
                      keep_last=2, log_every=20, ema_decay=0.95, seed=11)
    result = train(TrainSpec(build, loss_fn, data), cfg, ComputeConfig(precision=PRECISION),
                   sys.argv[1], progress=False)
    print(json.dumps({"resumed_from": result.resumed_from, "steps": result.steps,
                      "steps_per_s": result.images_per_s / cfg.batch_size}))
''')


# bf16 is slow-marked: the same 17 s again, for the autocast path of the same loop.
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path: Path,
                                                                 precision: str) -> None:
    script = tmp_path / "train_mlp.py"
    script.write_text(KILL_SCRIPT)
    run = [sys.executable, str(script)]
    reference = subprocess.Popen([*run, str(tmp_path / "ref"), "0", precision],
                                 stdout=subprocess.PIPE)
    victim = subprocess.Popen([*run, str(tmp_path / "victim"), "0.02", precision],
                              stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "victim" / ckpt.LATEST_FILE).exists():
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        assert victim.poll() is None
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        victim.kill()
    assert victim.returncode == -signal.SIGKILL

    rerun = subprocess.run([*run, str(tmp_path / "victim"), "0", precision], capture_output=True,
                           check=True)
    report = json.loads(rerun.stdout.decode().splitlines()[-1])
    assert 20 <= report["resumed_from"] < 200 and report["steps"] == 200
    assert reference.wait(timeout=60) == 0
    for which in ("model", "ema"):
        assert_same_state(ckpt.load_checkpoint_weights(tmp_path / "victim", which),
                          ckpt.load_checkpoint_weights(tmp_path / "ref", which))


# --------------------------------------------------------------------------------------------
# Ray Train.
# --------------------------------------------------------------------------------------------


def test_two_ray_workers_follow_the_in_process_run(ray_local, tmp_path: Path) -> None:  # noqa: F811
    spec = TrainSpec(build_mlp, mse_loss, toy_data())
    cfg = tiny_cfg(steps=20)
    one = train(spec, cfg, ComputeConfig(), tmp_path / "one", progress=False)
    tracker = RecordingTracker()
    torch.set_num_threads(2)  # the driver's; each worker trains on its cpus_per_worker (1)
    two = train(spec, cfg, ComputeConfig(num_workers=2), tmp_path / "two", tracker=tracker,
                progress=False)
    # What decided the last digits is the workers' setting, in the meta and the run's tags.
    from latentforge.models.layers import fp32_linear_backend

    assert two.numerics == {"torch_threads": 1, "device": "cpu",
                            "fp32_linear": fp32_linear_backend()}
    assert {k: v for k, v in tracker.tags.items() if k.startswith("latentforge.train_")} == {
        "latentforge.train_torch_threads": "1", "latentforge.train_device": "cpu",
        "latentforge.train_fp32_linear": fp32_linear_backend()}
    assert two.training_meta()["torch_threads"] == 1
    assert two.steps == 20 and [r["step"] for r in two.history] == [5, 10, 15, 20]
    for a, b in zip(one.history, two.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert_same_state(two.ema_state, one.ema_state, rtol=1e-3, atol=1e-4)
    assert [s for s, _ in tracker.rows] == [5, 10, 15, 20]
    assert tracker.rows[-1][1]["loss"] == pytest.approx(two.history[-1]["loss"])


def test_ray_workers_train_a_model_with_a_parameter_the_loss_does_not_use(
        ray_local, tmp_path: Path) -> None:  # noqa: F811
    # DDP waits for every parameter's gradient unless told some may not get one; the tiny
    # tokenizer (mask / dropped tokens unused without nested dropout) failed like this.
    spec = TrainSpec(WithAnOptionalPart, mse_loss, toy_data())
    result = train(spec, tiny_cfg(steps=10), ComputeConfig(num_workers=2), tmp_path,
                   progress=False)
    assert result.steps == 10 and torch.equal(result.model_state["unused"], torch.zeros(8))


def crash_at_step_15(model: nn.Module, batch: dict[str, torch.Tensor],
                     step: int) -> tuple[torch.Tensor, dict[str, float]]:
    if step == 15:  # after the checkpoint of step 10 reached the driver
        raise RuntimeError("simulated crash in a worker")
    return mse_loss(model, batch, step)


def test_a_failed_ray_run_says_where_a_rerun_resumes_and_leaves_no_run_folder(
        ray_local, tmp_path: Path) -> None:  # noqa: F811
    """Ray Train's failure was its own multi-line wrapper, and the run's folder in
    compute.storage_path stayed there (shared storage filled with failed runs' folders)."""
    from latentforge.errors import LatentForgeError

    storage = tmp_path / "shared"
    compute = ComputeConfig(num_workers=2, storage_path=str(storage))
    with pytest.raises(LatentForgeError) as failed:
        train(TrainSpec(build_mlp, crash_at_step_15, toy_data()), tiny_cfg(steps=20), compute,
              tmp_path / "ckpt", progress=False)
    line = str(failed.value)
    assert line.startswith("Ray Train stopped (run with -v for the traceback): ") and \
        "RuntimeError: simulated crash in a worker" in line, line
    assert line.endswith("a rerun resumes from step 10, the last checkpoint copied here"), line
    assert "\n" not in line
    assert storage.is_dir() and not list(storage.iterdir()), list(storage.iterdir())
    assert [s for s, _ in ckpt.committed_steps(tmp_path / "ckpt")] == [10]


def test_training_on_a_cluster_needs_storage_every_node_reaches(tmp_path: Path) -> None:
    from latentforge.errors import ConfigError
    from latentforge.training import _ray_storage

    with pytest.raises(ConfigError, match="compute.storage_path is null.*127.0.0.1:6379"):
        _ray_storage(ComputeConfig(ray_address="127.0.0.1:6379"), tmp_path)
    # s3:// goes through pyarrow's fsspec handler; a path is used as it is; neither is removed.
    path, pa_fs, _, remove = _ray_storage(
        ComputeConfig(ray_address="127.0.0.1:6379", storage_path="s3://bucket/ray"), tmp_path)
    assert (path, type(pa_fs).__name__, remove) == ("bucket/ray", "PyFileSystem", False)
    path, pa_fs, _, remove = _ray_storage(ComputeConfig(storage_path=str(tmp_path / "s")),
                                          tmp_path)
    assert (path, pa_fs, remove) == (str(tmp_path / "s"), None, False)


def test_a_warm_up_as_long_as_training_is_said(tmp_path: Path, caplog) -> None:
    """Lowering only `steps` for a quick run (generator: warm-up 100) ends training at its
    highest learning rate, never decayed: allowed, but said."""
    with caplog.at_level(logging.WARNING, logger="latentforge.training"):
        train(TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg(steps=4, warmup_steps=4,
                                                                    save_every=4),
              ComputeConfig(), tmp_path / "judge", progress=False)
    assert "warmup_steps = 4 is not below steps = 4 (judge): the learning rate is still " \
           "rising" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentforge.training"):
        train(TrainSpec(build_mlp, mse_loss, toy_data()), tiny_cfg(steps=4, warmup_steps=3,
                                                                    save_every=4),
              ComputeConfig(), tmp_path / "other", progress=False)
    assert "warmup_steps" not in caplog.text
