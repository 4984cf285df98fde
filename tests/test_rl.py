"""The rl stage: rollout log-probabilities and the GRPO objective against references, then
smoke runs on the tiny preset (outputs, resume after a crash, the KL leash with flat rewards,
failing rewards, and the reward going up)."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from chain import train_through_generator
from safetensors.torch import load_file
from torch.distributions import Normal

from latentforge.config import Params, build_params, load_params
from latentforge.errors import ConfigError
from latentforge.models.generator import FlowTransformer, generator_config
from latentforge.rewards import RewardError
from latentforge.runner import StageResult
from latentforge.tasks import generator, rl
from latentforge.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- user rewards (module:function)


def constant_reward(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.full(len(images), 0.1)  # 0.1 is inexact in binary: the group std is round-off


def brightness_reward(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0


def wrong_shape_reward(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.zeros((len(images), 2))


def raising_reward(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    raise RuntimeError("reward service unavailable")


class _NaNAfter:
    """NaN from the n-th call on: the base evaluation passes, a later rollout fails."""

    def __init__(self, calls: int) -> None:
        self.calls, self.left = calls, calls

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        self.left -= 1
        out = np.zeros(len(images))
        if self.left < 0:
            out[0] = np.nan
        return out


late_nan_reward = _NaNAfter(2)


class RecordingTracker(Tracker):
    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.models: list[tuple[str, str, dict[str, str]]] = []
        self.inputs: list[str] = []

    def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001 - Tracker's signature
        self.metrics.append((step, dict(metrics)))

    def log_input(self, name, source, digest, context, profile=None) -> None:  # noqa: ANN001
        self.inputs.append(name)

    def log_model(self, name, model_dir, registered_name, tags=None,  # noqa: ANN001, ANN201
                  artifacts=None):  # noqa: ANN001
        self.models.append((name, registered_name, dict(tags or {})))
        return None


# ------------------------------------------------------------------------------ unit tests


def random_policy(seed: int = 0) -> FlowTransformer:
    """A tiny generator with every weight random (the real init predicts a zero velocity)."""
    torch.manual_seed(seed)
    model = FlowTransformer(generator_config("tiny", num_tokens=4, token_dim=3, num_classes=5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def test_rollout_log_probs_match_normal_and_rescore_to_ratio_one() -> None:
    cfg = build_params({"rl": {"train_steps": 5, "cfg_scale": 1.5, "timestep_fraction": 0.6}}).rl
    policy = random_policy()
    labels = torch.tensor([0, 0, 3, 3, 4, 4])
    ro = rl.rollout(policy, labels, steps=cfg.train_steps, noise_level=cfg.noise_level,
                    cfg_scale=cfg.cfg_scale, generator=torch.Generator().manual_seed(0))
    n, t_steps = len(labels), cfg.train_steps
    assert ro.x_t.shape == (n, t_steps, 4, 3) and ro.log_prob.shape == (n, t_steps)
    assert torch.equal(ro.x_t[:, 1:], ro.x_next[:, :-1])  # one chain per sample
    # Each stored step is N(mean, std^2) with the SDE's mean and std, from the guided velocity.
    a, dt = cfg.noise_level, 1.0 / t_steps
    with torch.no_grad():
        for j in range(t_steps):
            x, t = ro.x_t[:, j], j / t_steps
            v_c = policy(x, torch.full((n,), t), labels)
            v_u = policy(x, torch.full((n,), t), torch.full_like(labels, policy.null_class))
            v = v_u + cfg.cfg_scale * (v_c - v_u)
            t_safe = max(t, dt)
            mean = x + (v + a**2 / (2 * t_safe) * (t * v - x)) * dt
            std = a * math.sqrt((1 - t) / t_safe * dt)
            expected = Normal(mean, std).log_prob(ro.x_next[:, j]).flatten(1).sum(1)
            torch.testing.assert_close(ro.log_prob[:, j], expected, rtol=1e-5, atol=1e-4)

    # Rescoring stored steps with the unchanged policy: ratio 1, nothing clipped, KL to an
    # identical reference 0, and still differentiable.
    chosen = rl.trained_steps(n, t_steps, cfg.timestep_fraction, torch.Generator().manual_seed(1))
    assert chosen.shape == (n, 3) and all(len(set(row.tolist())) == 3 for row in chosen)
    reference = copy.deepcopy(policy).requires_grad_(False)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    for j in range(chosen.shape[1]):
        new = rl.rescore_steps(policy, ro, chosen[:, j], noise_level=a, cfg_scale=cfg.cfg_scale)
        stored = ro.log_prob[torch.arange(n), chosen[:, j]]
        torch.testing.assert_close(new.log_prob, stored, rtol=0, atol=2e-4)
        loss, stats = rl.grpo_loss(policy, reference, ro, chosen[:, j], adv,
                                   torch.ones(n, dtype=torch.bool), cfg)
        assert abs(stats["ratio_mean"].item() - 1) < 1e-5 and stats["clip_fraction"] == 0
        assert stats["kl"].item() == 0.0
        loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_group_advantages_normalise_clip_and_mask_flat_groups() -> None:
    rewards = np.array([1.0, 2.0, 3.0, 4.0,  # a normal group
                        0.1, 0.1, 0.1, 0.1,  # constant, with round-off in its mean
                        0.0, 0.0, 0.0, 100.0])  # one outlier: clipped
    adv, valid = rl.group_advantages(rewards, group_size=4, clip=1.5)
    g = rewards[:4]
    np.testing.assert_allclose(adv[:4], (g - g.mean()) / max(g.std(), rl.ADV_EPS))
    assert valid.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert (adv[4:8] == 0).all()
    assert adv[11] == 1.5 and (np.abs(adv) <= 1.5).all()


def test_kl_term_pulls_a_drifted_policy_back_without_reward_signal() -> None:
    cfg = build_params({"rl": {"train_steps": 4, "kl_beta": 1.0}}).rl
    reference = random_policy(0).requires_grad_(False)
    policy = random_policy(1)
    labels = torch.tensor([1, 1, 2, 2])
    ro = rl.rollout(policy, labels, steps=4, noise_level=cfg.noise_level, cfg_scale=1.0,
                    generator=torch.Generator().manual_seed(0))
    step_index = torch.tensor([0, 1, 2, 3])
    zeros, flat = torch.zeros(4), torch.zeros(4, dtype=torch.bool)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)
    kls = []
    for _ in range(3):
        loss, stats = rl.grpo_loss(policy, reference, ro, step_index, zeros, flat, cfg)
        assert stats["policy_loss"] == 0  # masked groups: the KL is all that is left
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kls.append(stats["kl"].item())
    assert kls[0] > 0 and kls[2] < kls[0]


def test_update_labels_are_seeded_groups() -> None:
    cfg = build_params({"rl": {"classes_per_step": 3, "group_size": 2}}).rl
    a = rl.update_labels(cfg, 5, 7, num_classes=10)
    assert a.tolist() == rl.update_labels(cfg, 5, 7, num_classes=10).tolist()
    assert len(set(a[::2].tolist())) == 3 and (a[::2] == a[1::2]).all()
    assert a.tolist() != rl.update_labels(cfg, 5, 8, num_classes=10).tolist()
    assert a.tolist() != rl.update_labels(cfg, 6, 7, num_classes=10).tolist()


# ------------------------------------------------------------------------- stage smoke runs


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, ray_local):
    """prepare -> judge -> tokenizer -> cache -> generator on the tiny preset, once."""
    return train_through_generator(tmp_path_factory.mktemp("rl_inputs"),
                                   load_params(REPO / "presets/tiny.yaml"))


def tiny(**rl_overrides) -> Params:
    raw = load_params(REPO / "presets/tiny.yaml").to_dict()
    raw["rl"].update(rl_overrides)
    return build_params(raw)


def run_rl(inputs: Path, params: Params, out: Path,
           tracker: Tracker | None = None) -> StageResult:
    return rl.run(params, out_dir=out, generator_dir=inputs / "generator",
                  tokenizer_dir=inputs / "tokenizer", judge_dir=inputs / "judge",
                  prepared_dir=inputs / "prepared", plot_file=out.parent / f"{out.name}.csv",
                  tracker=tracker)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_outputs_and_resume_after_crash(tiny_inputs, tmp_path, monkeypatch):
    params = tiny()
    steps = params.rl.steps  # 3 updates, checkpoints at 2 and 3, evaluations at 0, 2 and 3
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    monkeypatch.chdir(first_dir)
    tracker = RecordingTracker()
    out = first_dir / "rl"
    first = run_rl(tiny_inputs, params, out, tracker)

    assert {p.name for p in out.iterdir()} == {"model.safetensors", "generator.json",
                                               "samples.png", "train_curve.csv"}
    handle = generator.load_generator(out, tiny_inputs / "tokenizer")
    assert handle.sample_images(np.array([0, 1]), seed=0, steps=2, cfg_scale=1.0).shape[0] == 2
    meta = json.loads((out / "generator.json").read_text())
    base_sha = generator.load_generator(tiny_inputs / "generator",
                                        tiny_inputs / "tokenizer").meta["sha256"]
    assert meta["rl"]["base_generator_sha256"] == base_sha
    assert meta["rl"]["reward"] == "1*judge_prob"
    assert meta["rl"]["params"]["steps"] == steps
    assert meta["rl"]["other_seeds"] == []  # the first seed's folder lists the others: none
    assert set(meta["rl"]["eval_before"]) >= {"reward_mean", "gfd_eval", "eval_accuracy"}
    m = first.metrics
    for key in ("reward_mean", "eval_accuracy", "gfd_eval"):
        assert np.isfinite(m[f"before_{key}"]) and np.isfinite(m[f"after_{key}"])
    assert {"gfd_change_ratio", "final_kl", "mean_zero_spread"} <= set(m)
    # FD depends on the count: the metrics say what the before/after gFD was measured at
    assert m["eval_samples"] == meta["rl"]["eval_protocol"]["samples"] > 0
    assert all(v == round(v, 6) for v in m.values())
    rows = read_csv(first_dir / "rl.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert [bool(r["eval_gfd_eval"]) for r in rows] == [False, True, True]
    assert (out / "train_curve.csv").read_text() == (first_dir / "rl.csv").read_text()
    logged = {step for step, _ in tracker.metrics}
    assert logged == set(range(steps + 1))  # step 0 = the base model's evaluation
    assert any("eval/gfd_eval" in row for step, row in tracker.metrics if step == 0)
    name, registered, tags = tracker.models[0]
    assert registered == "latentforge-generator-rl" and tags["base_generator_sha256"] == base_sha
    assert set(tracker.inputs) >= {"generator", "judge", "tokenizer"}
    assert first.timings["resumed_from_step"] == 0

    # A crash in update 3, after the checkpoint of update 2: the rerun resumes and ends with
    # the same weights and metrics as the uninterrupted run.
    monkeypatch.chdir(second_dir)
    real_update = rl.FineTuner.update

    def crash_at_3(self, step):  # noqa: ANN001, ANN202
        if step == 3:
            raise KeyboardInterrupt("preempted")
        return real_update(self, step)

    with monkeypatch.context() as mp:
        mp.setattr(rl.FineTuner, "update", crash_at_3)
        with pytest.raises(KeyboardInterrupt):
            run_rl(tiny_inputs, params, second_dir / "rl")
    assert not (second_dir / "rl").exists()
    resumed = run_rl(tiny_inputs, params, second_dir / "rl")
    assert resumed.timings["resumed_from_step"] == 2
    assert resumed.metrics == first.metrics
    assert (second_dir / "rl/model.safetensors").read_bytes() == \
        (out / "model.safetensors").read_bytes()
    assert (second_dir / "rl.csv").read_text() == (first_dir / "rl.csv").read_text()

    # A finished run returns from its last checkpoint without training.
    monkeypatch.chdir(first_dir)
    again = run_rl(tiny_inputs, params, first_dir / "again")
    assert again.timings["resumed_from_step"] == steps
    assert again.metrics == first.metrics
    assert (first_dir / "again/model.safetensors").read_bytes() == \
        (out / "model.safetensors").read_bytes()

    # Another configuration does not resume these checkpoints.
    other = run_rl(tiny_inputs, tiny(lr=params.rl.lr * 2), first_dir / "other")
    assert other.timings["resumed_from_step"] == 0


def test_several_seeds_one_folder_and_each_resumes_on_its_own(tiny_inputs, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = run_rl(tiny_inputs, tiny(seeds=[0], eval_every=0), tmp_path / "one")
    tracker = RecordingTracker()
    two = run_rl(tiny_inputs, tiny(seeds=[0, 1], eval_every=0), tmp_path / "two", tracker)
    # Seed 0's checkpoints are reused (its fingerprint does not hold the seed list): same
    # weights, nothing retrained; seed 1 is trained from the same base into seeds/seed_1.
    assert two.timings["resumed_from_step"] == tiny().rl.steps
    assert (tmp_path / "two/model.safetensors").read_bytes() == \
        (tmp_path / "one/model.safetensors").read_bytes()
    other = tmp_path / "two/seeds/seed_1"
    assert {p.name for p in other.iterdir()} == {"model.safetensors", "generator.json",
                                                 "samples.png", "train_curve.csv"}
    first = load_file(str(tmp_path / "two/model.safetensors"))
    second = load_file(str(other / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    meta = json.loads((tmp_path / "two/generator.json").read_text())
    assert meta["rl"]["seed"] == 0 and meta["rl"]["other_seeds"] == [[1, "seeds/seed_1"]]
    meta1 = json.loads((other / "generator.json").read_text())
    assert meta1["rl"]["seed"] == 1 and meta1["rl"]["eval_before"] == meta["rl"]["eval_before"]
    assert generator.load_generator(other, tiny_inputs / "tokenizer").meta["sha256"]
    # The first seed's metrics keep their names; the others' are prefixed; gains are averaged.
    m = two.metrics
    # Seed 0's numbers, from its finished checkpoint: graded here by a worker process (other
    # thread counts round differently), in `one` by this process.
    assert {k: v for k, v in m.items() if k in one.metrics} == pytest.approx(one.metrics,
                                                                            abs=2e-6)
    assert m["seed1_after_gfd_eval"] == meta1["metrics"]["gfd_eval"]
    assert m["seeds_mean_reward_gain"] == pytest.approx(
        (m["reward_gain"] + m["seed1_reward_gain"]) / 2, abs=2e-6)
    assert any("seed1/reward_mean" in row for _, row in tracker.metrics)
    assert tracker.models[0][2]["rl_seeds"] == "0,1"


def test_seeds_side_by_side_in_worker_processes_equal_one_after_another(tiny_inputs, tmp_path,
                                                                       monkeypatch, caplog):
    raw = tiny(seeds=[0, 1], eval_every=0).to_dict()
    runs = {}
    for processes in (1, 2):
        raw["compute"]["parallel_seeds"] = processes
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        monkeypatch.chdir(folder)  # checkpoints of its own: both train from scratch
        tracker = RecordingTracker()
        with caplog.at_level("INFO", logger="latentforge.tasks.rl"):
            runs[processes] = (run_rl(tiny_inputs, build_params(raw), folder / "rl", tracker),
                               tracker)
    assert "2 seeds, 2 at a time in worker processes" in caplog.text
    assert runs[2][0].timings["seed_processes"] == 2 and runs[1][0].timings["seed_processes"] == 1
    (one, one_tracker), (two, two_tracker) = runs[1], runs[2]
    # Other thread counts may round differently (fp32): equal within float tolerance.
    assert two.metrics.keys() == one.metrics.keys()
    for key, value in one.metrics.items():
        assert two.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for sub in ("rl", "rl/seeds/seed_1"):
        a = load_file(str(tmp_path / "p1" / sub / "model.safetensors"))
        b = load_file(str(tmp_path / "p2" / sub / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
        meta_a = json.loads((tmp_path / "p1" / sub / "generator.json").read_text())
        meta_b = json.loads((tmp_path / "p2" / sub / "generator.json").read_text())
        assert meta_b["rl"]["seed"] == meta_a["rl"]["seed"]
        assert meta_b["rl"].get("other_seeds") == meta_a["rl"].get("other_seeds")
    # The workers' metric rows reach the stage's tracker: the same steps and keys.
    assert sorted((step, sorted(row)) for step, row in two_tracker.metrics) == \
        sorted((step, sorted(row)) for step, row in one_tracker.metrics)
    assert two_tracker.models[0][2]["rl_seeds"] == "0,1"


KILLED_RUN = """
import json, sys
sys.path[:0] = {path!r}
from latentforge.config import build_params
from latentforge.tasks import rl
inputs = {inputs!r}
rl.run(build_params(json.loads({raw!r})), out_dir="rl", generator_dir=inputs + "/generator",
       tokenizer_dir=inputs + "/tokenizer", judge_dir=inputs + "/judge",
       prepared_dir=inputs + "/prepared", plot_file="rl.csv")
"""


def test_side_by_side_seeds_killed_mid_run_resume_to_the_same_models(tiny_inputs, tmp_path,
                                                                      monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = tiny(seeds=[0, 1], steps=40, save_every=2, eval_every=0).to_dict()
    raw["compute"]["parallel_seeds"] = 2
    params = build_params(raw)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    monkeypatch.chdir(whole)
    reference = run_rl(tiny_inputs, params, whole / "rl")

    # The same stage in a process of its own, SIGKILLed with its workers (one process group,
    # as `latentforge run` holds a stage) once both seeds have written a checkpoint.
    script = KILLED_RUN.format(path=sys.path, inputs=str(tiny_inputs), raw=json.dumps(raw))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=killed, start_new_session=True)
    ckpts = killed / ".latentforge/checkpoints/rl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpts.is_dir() and sum((d / "latest").exists() for d in ckpts.iterdir()) == 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before both seeds had a checkpoint"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert not (killed / "rl").exists()

    monkeypatch.chdir(killed)
    resumed = run_rl(tiny_inputs, params, killed / "rl")
    assert 2 <= resumed.timings["resumed_from_step_min"] < params.rl.steps
    for key, value in reference.metrics.items():
        assert resumed.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for sub in ("rl", "rl/seeds/seed_1"):
        a = load_file(str(whole / sub / "model.safetensors"))
        b = load_file(str(killed / sub / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["test_rl:raising_reward", "test_rl:late_nan_reward"])
def test_a_reward_failing_in_a_worker_stops_the_stage_and_writes_nothing(tiny_inputs, tmp_path,
                                                                        monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    raw = tiny(rewards={"judge_logprob": 1.0, name: 0.5}, seeds=[0, 1], save_every=1).to_dict()
    raw["compute"]["parallel_seeds"] = 2
    with pytest.raises(RewardError, match=name) as raised:
        run_rl(tiny_inputs, build_params(raw), tmp_path / "rl")
    assert "in the worker process of rl seed" in raised.value.__notes__[0]
    assert not (tmp_path / "rl").exists() and not (tmp_path / "rl.csv").exists()


def test_flat_reward_keeps_the_policy_at_the_reference(tiny_inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny(rewards={"test_rl:constant_reward": 1.0}, kl_beta=0.1, eval_every=0)
    result = run_rl(tiny_inputs, params, tmp_path / "rl")
    assert result.metrics["mean_zero_spread"] == 1.0 and result.metrics["final_kl"] == 0.0
    assert all(float(r["zero_spread"]) == 1.0 for r in read_csv(tmp_path / "rl.csv"))
    base = load_file(str(tiny_inputs / "generator/model.safetensors"))
    tuned = load_file(str(tmp_path / "rl/model.safetensors"))
    assert base.keys() == tuned.keys()
    assert all(torch.equal(base[k], tuned[k]) for k in base)


def test_judge_density_reward_through_the_stage(tiny_inputs, tmp_path, monkeypatch):
    """judge_density fits its class Gaussians on the stage's prepared train split; its term is
    recorded beside judge_prob's, and the reward is their sum."""
    monkeypatch.chdir(tmp_path)
    params = tiny(rewards={"judge_prob": 1.0, "judge_density": 1.0}, seeds=[0], eval_every=0)
    result = run_rl(tiny_inputs, params, tmp_path / "rl")
    meta = json.loads((tmp_path / "rl/generator.json").read_text())
    assert meta["rl"]["reward"] == "1*judge_density + 1*judge_prob"
    for phase in ("eval_before", "eval_after"):
        density = meta["rl"][phase]["reward/judge_density"]
        prob = meta["rl"][phase]["reward/judge_prob"]
        assert np.isfinite(density)
        assert meta["rl"][phase]["reward_mean"] == pytest.approx(density + prob, abs=1e-9)
    assert np.isfinite(result.metrics["after_reward_mean"])


@pytest.mark.parametrize("name", ["test_rl:late_nan_reward", "test_rl:wrong_shape_reward",
                                  "test_rl:raising_reward"])
def test_bad_reward_stops_the_stage_and_writes_nothing(tiny_inputs, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(__import__("test_rl"), "late_nan_reward", _NaNAfter(2))
    params = tiny(rewards={"judge_logprob": 1.0, name: 0.5}, save_every=1)
    with pytest.raises(RewardError, match=name):
        run_rl(tiny_inputs, params, tmp_path / "rl")
    assert not (tmp_path / "rl").exists() and not (tmp_path / "rl.csv").exists()


def test_reward_goes_up_on_the_fixed_eval_sample(tiny_inputs, tmp_path, monkeypatch):
    # The tiny generator barely depends on the class, so the judge's reward cannot move in a
    # few updates; image brightness is a reward its latents do control.
    monkeypatch.chdir(tmp_path)
    # Std-normalised advantages: brightness differs by ~1e-2 between rollouts, which as raw
    # advantages (the default, advantage: none) would move a tiny model little in 20 updates.
    params = tiny(rewards={"test_rl:brightness_reward": 1.0}, steps=20, lr=1e-3,
                  group_size=8, eval_every=5, advantage="global", kl_beta=0.04)
    result = run_rl(tiny_inputs, params, tmp_path / "rl")
    m = result.metrics
    assert m["after_reward_mean"] > m["before_reward_mean"] + 1e-3
    evals = [float(r["eval_reward_mean"]) for r in read_csv(tmp_path / "rl.csv")
             if r["eval_reward_mean"]]
    assert evals[-1] == m["after_reward_mean"] and evals[-1] > evals[0]


def test_user_reward_beside_params_yaml_is_importable(tmp_path, monkeypatch):
    """The `latentforge` console script puts its bin folder, not the project, first on
    sys.path; a reward module beside params.yaml must still be found."""
    import sys

    from latentforge.rewards import resolve

    (tmp_path / "lf_project_rewards.py").write_text(
        "import numpy as np\n\ndef brightness(images, labels):\n"
        "    return images.reshape(len(images), -1).mean(axis=1) / 255.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = resolve("lf_project_rewards:brightness", judge=None)
    images = np.full((2, 4, 4, 1), 255, dtype=np.uint8)
    assert fn(images, np.zeros(2, dtype=int)).tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError, match="cannot import module 'no_such_reward_module'"):
        resolve("no_such_reward_module:fn", judge=None)


def test_advantage_modes_scale_by_group_batch_or_nothing_with_a_floor() -> None:
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 10.5, 11.0, 11.5])
    mean = np.repeat(rewards.reshape(2, 4).mean(1), 4)
    group = rl.group_advantages(rewards, 4, clip=100, mode="group")[0]
    np.testing.assert_allclose(group[:4], (rewards[:4] - mean[:4]) / rewards[:4].std())
    glob = rl.group_advantages(rewards, 4, clip=100, mode="global")[0]
    np.testing.assert_allclose(glob, (rewards - mean) / rewards.std())
    none = rl.group_advantages(rewards, 4, clip=100, mode="none")[0]
    np.testing.assert_allclose(none, rewards - mean)
    # a batch whose rewards differ by 1e-6: with the floor, a 1e-6-sized step, not a unit one
    tiny_spread = 0.5 + 1e-6 * np.arange(8.0)
    for mode in ("group", "global"):
        adv = rl.group_advantages(tiny_spread, 4, clip=100, mode=mode, std_floor=1e-3)[0]
        assert np.abs(adv).max() < 1e-2, mode
        unfloored = rl.group_advantages(tiny_spread, 4, clip=100, mode=mode, std_floor=1e-12)[0]
        assert np.abs(unfloored).max() > 0.5, mode  # what the floor prevents: unit-size steps
    # equal rewards: zero advantages in every mode
    for mode in ("group", "global", "none"):
        adv, valid = rl.group_advantages(np.full(8, 0.3), 4, clip=5, mode=mode)
        assert (adv == 0).all() and not valid.any()


def test_judge_prob_and_jpeg_rewards() -> None:
    from latentforge import rewards

    class Judge:
        def score(self, images):  # noqa: ANN001, ANN202
            logits = images.reshape(len(images), -1)[:, :3].astype(np.float64) / 50.0
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            return None, logp

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 16, 16, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0])
    prob = rewards.resolve("judge_prob", Judge())(images, labels)
    logprob = rewards.resolve("judge_logprob", Judge())(images, labels)
    np.testing.assert_allclose(prob, np.exp(logprob))
    assert ((prob > 0) & (prob <= 1)).all()

    flat = np.full((2, 16, 16, 3), 128, np.uint8)
    noisy = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    both = np.concatenate([flat, noisy])
    small = rewards.resolve("jpeg_compressibility", None)(both, np.zeros(4, int))
    large = rewards.resolve("jpeg_incompressibility", None)(both, np.zeros(4, int))
    np.testing.assert_array_equal(small, -large)
    assert large[2:].min() > large[:2].max()  # noise costs more bytes than a flat grey
    assert (rewards.jpeg_kilobytes(images) > 0).all()  # grayscale (N, H, W, 1) too


def test_minibatches_must_fit_the_rollouts() -> None:
    with pytest.raises(ConfigError, match="minibatches = 33"):
        build_params({"rl": {"classes_per_step": 4, "group_size": 8, "minibatches": 33}})
    with pytest.raises(ConfigError, match="rl.advantage"):
        build_params({"rl": {"advantage": "batch"}})


def test_minibatches_and_epochs_make_the_clip_act(tiny_inputs, tmp_path, monkeypatch):
    """One pass, one minibatch: every ratio is 1 up to float round-off (rescoring in other
    batch shapes), i.e. REINFORCE with a baseline. Two passes over four minibatches: after the
    first optimizer step the policy differs from the rollouts', so log-ratios move off 0 and
    approx-KL grows by orders of magnitude."""
    monkeypatch.chdir(tmp_path)
    common = {"rewards": {"test_rl:brightness_reward": 1.0}, "steps": 2, "lr": 1e-3,
              "eval_every": 0, "save_every": 10}
    run_rl(tiny_inputs, tiny(**common, minibatches=1), tmp_path / "single")
    single = read_csv(tmp_path / "single.csv")
    for row in single:
        assert float(row["clip_fraction"]) == 0.0
        assert -1e-3 < float(row["log_ratio_min"]) <= float(row["log_ratio_max"]) < 1e-3
    run_rl(tiny_inputs, tiny(**common, inner_epochs=2, minibatches=4), tmp_path / "multi")
    multi = read_csv(tmp_path / "multi.csv")
    for before, after in zip(single, multi, strict=True):
        assert float(after["approx_kl"]) > 100 * float(before["approx_kl"]) + 1e-9
        spread = float(after["log_ratio_max"]) - float(after["log_ratio_min"])
        assert spread > 10 * (float(before["log_ratio_max"]) - float(before["log_ratio_min"]))


def test_trained_steps_random_subsets_or_the_first_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    random = rl.trained_steps(5, 10, 0.6, gen)
    assert random.shape == (5, 6)
    assert all(len(set(row.tolist())) == 6 for row in random)
    assert len({tuple(sorted(row.tolist())) for row in random}) > 1
    first = rl.trained_steps(5, 10, 0.6, gen, "first")
    assert (first == torch.arange(6)).all()


def test_ratio_clip_and_kl_are_in_flow_grpo_per_dimension_units() -> None:
    """Flow-GRPO's reference code averages step log-probs over the latent's dimensions and its
    KL is mean_d (mean - mean_ref)^2 / (2 sigma_t^2) with sigma_t^2 = step variance / dt; the
    loss's ratio, clip and KL must be those, computed here from the SDE step directly."""
    steps, eps = 5, 1e-3
    cfg = build_params({"rl": {"train_steps": steps, "clip_range": eps}}).rl
    reference = random_policy(0).requires_grad_(False)
    rollout_policy = random_policy(0)
    labels = torch.tensor([0, 1, 2, 3])
    ro = rl.rollout(rollout_policy, labels, steps=steps, noise_level=cfg.noise_level,
                    cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    policy = random_policy(0)
    with torch.no_grad():  # a policy a little off the rollouts'
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    step_index = torch.tensor([0, 1, 3, 4])
    _, stats = rl.grpo_loss(policy, reference, ro, step_index, torch.ones(4),
                            torch.ones(4, dtype=torch.bool), cfg)
    n_dims, dt = 4 * 3, 1.0 / steps
    new = rl.rescore_steps(policy, ro, step_index, noise_level=cfg.noise_level, cfg_scale=1.0)
    ref = rl.rescore_steps(reference, ro, step_index, noise_level=cfg.noise_level, cfg_scale=1.0)
    log_ratio = (new.log_prob - ro.log_prob[torch.arange(4), step_index]) / n_dims
    sigma_t2 = new.std.pow(2).flatten() / dt
    kl = ((new.mean - ref.mean).pow(2).flatten(1).mean(1) / (2 * sigma_t2)).mean()
    torch.testing.assert_close(stats["log_ratio_max"], log_ratio.max().detach())
    torch.testing.assert_close(stats["log_ratio_min"], log_ratio.min().detach())
    torch.testing.assert_close(stats["kl"], kl.detach(), rtol=1e-4, atol=0)
    clipped = ((log_ratio.exp() - 1).abs() > eps).float().mean()
    assert stats["clip_fraction"] == clipped and clipped > 0  # the per-dimension ratio clips
    assert stats["kl"] > 0


def test_class_density_against_a_direct_gaussian_and_its_errors() -> None:
    """judge_density's Gaussians: pooled within-class covariance, shrunk, per-dimension units;
    checked against scipy's log-density of the same Gaussian."""
    from scipy.stats import multivariate_normal

    from latentforge import rewards

    rng = np.random.default_rng(0)
    dim, per_class = 6, 200
    labels = np.repeat(np.arange(3), per_class)
    centres = rng.normal(0, 5, (3, dim))
    mixing = rng.normal(size=(dim, dim))  # correlated features, one covariance for all classes
    feats = centres[labels] + rng.normal(size=(len(labels), dim)) @ mixing
    density = rewards.ClassDensity(feats, labels, 3, shrinkage=0.1)

    means = np.stack([feats[labels == c].mean(0) for c in range(3)])
    pooled = sum(np.cov(feats[labels == c].T, bias=True) * per_class for c in range(3)) / len(feats)
    shrunk = 0.9 * pooled + 0.1 * np.trace(pooled) / dim * np.eye(dim)
    queries = rng.normal(0, 5, (20, dim))
    q_labels = rng.integers(0, 3, 20)
    expected = np.array([
        (multivariate_normal(means[c], shrunk).logpdf(q) - multivariate_normal(means[c], shrunk)
         .logpdf(means[c])) / dim for q, c in zip(queries, q_labels, strict=True)])
    np.testing.assert_allclose(density.log_density(queries, q_labels), expected, rtol=1e-9)
    np.testing.assert_allclose(density.log_density(means, np.arange(3)), 0.0, atol=1e-12)
    # the same point is typical of its own class and atypical of another
    own, other = density.log_density(np.repeat(means[:1], 2, 0), np.array([0, 1]))
    assert own > other

    with pytest.raises(rewards.RewardError, match=r"class\(es\) \[2\] have no reference images"):
        rewards.ClassDensity(feats[labels < 2], labels[labels < 2], 3)
    with pytest.raises(rewards.RewardError, match="features do not vary"):
        rewards.ClassDensity(np.zeros((6, dim)), np.array([0, 0, 1, 1, 2, 2]), 3)
    with pytest.raises(ConfigError, match="judge_density needs real reference images"):
        rewards.resolve("judge_density", judge=None)


def test_judge_density_rewards_typical_images_of_the_requested_class() -> None:
    """Through resolve and Reward: the judge's features of the reference images define each
    class; an image like class 0's reference scores higher as class 0 than as class 1."""
    from latentforge import rewards

    class Judge:
        class_names = ["dark", "bright"]

        def score(self, images):  # noqa: ANN001, ANN202
            flat = np.asarray(images, np.float64).reshape(len(images), -1)
            feats = np.stack([flat.mean(1), flat.std(1)], axis=1)
            return feats, np.zeros((len(images), 2))

    rng = np.random.default_rng(1)
    dark = rng.integers(0, 60, (30, 8, 8, 1), dtype=np.uint8)
    bright = rng.integers(180, 256, (30, 8, 8, 1), dtype=np.uint8)
    reference = (np.concatenate([dark, bright]), np.repeat([0, 1], 30))
    reward = rewards.Reward({"judge_density": 1.0}, Judge(), reference=reference)
    probe = rng.integers(0, 60, (4, 8, 8, 1), dtype=np.uint8)
    as_dark, _ = reward(probe, np.zeros(4, int))
    as_bright, parts = reward(probe, np.ones(4, int))
    assert (as_dark > as_bright).all() and parts["judge_density"] == as_bright.mean()
    assert reward.definition() == "1*judge_density"


def test_judge_terms_share_one_scoring_per_call() -> None:
    """Several judge terms in one reward run the judge once per batch, give what each term
    gives alone, and a batch rewritten in place between calls is scored afresh."""
    from latentforge import rewards

    class Judge:
        class_names = ["dark", "bright"]
        calls = 0

        def score(self, images):  # noqa: ANN001, ANN202
            Judge.calls += 1
            flat = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
            feats = np.stack([flat.mean(1), flat.std(1)], axis=1)
            logits = np.stack([-4.0 * flat.mean(1), 4.0 * flat.mean(1)], axis=1)
            return feats, logits - np.logaddexp(logits[:, :1], logits[:, 1:])

    rng = np.random.default_rng(2)
    reference = (rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.repeat([0, 1], 20))
    terms = {"judge_prob": 1.0, "judge_margin": 0.5, "judge_density": 2.0}
    combined = rewards.Reward(terms, Judge(), reference=reference)
    alone = {n: rewards.Reward({n: w}, Judge(), reference=reference) for n, w in terms.items()}
    images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, 6)
    Judge.calls = 0
    total, parts = combined(images, labels)
    assert Judge.calls == 1
    expected = sum(alone[n](images, labels)[0] for n in terms)
    np.testing.assert_allclose(total, expected, rtol=1e-12)
    images[:] = 255 - images  # the same array, new pixels: not the remembered scores
    total2, _ = combined(images, labels)
    assert Judge.calls == 2 + len(terms)
    np.testing.assert_allclose(total2, sum(alone[n](images, labels)[0] for n in terms), rtol=1e-12)


def test_a_driver_without_a_gpu_fine_tunes_on_its_cpus(tiny_inputs, caplog, monkeypatch):
    """compute.use_gpu is for the cluster's workers; the rl stage runs in the driver, which
    on a CPU head node or a laptop has no GPU: it says so and uses the CPU (it refused)."""
    import logging

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver without one
    params = build_params({**tiny().to_dict(), "compute": {"use_gpu": True}})
    dirs = rl.InputDirs(generator=tiny_inputs / "generator", tokenizer=tiny_inputs / "tokenizer",
                        judge=tiny_inputs / "judge", prepared=tiny_inputs / "prepared",
                        evaluator=tiny_inputs / "evaluator", decoder=tiny_inputs / "decoder")
    with caplog.at_level(logging.WARNING, logger="latentforge.training"):
        inp = rl.load_inputs(params, dirs)
    assert inp.device.type == "cpu"
    assert "sees no CUDA device: RL fine-tuning runs on its CPUs" in caplog.text
