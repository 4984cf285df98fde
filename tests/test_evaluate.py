"""The evaluate stage end to end on tiny inputs: report files and links, metric keys and order,
the protocol in the report, byte-identical reruns, FID only with local Inception weights, and
clear errors for missing inputs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from latentforge import intervals
from latentforge.config import build_params, load_params
from latentforge.errors import ConfigError, DataError
from latentforge.tasks import cache, evaluate, generator, judge, prepare, rl, tokenizer

REPO = Path(__file__).resolve().parents[1]
REPORT_FILES = {"report.md", "protocol.json", "samples_base_vs_rl.png", "tokenizer_recon.png",
                "cfg_sweep.png", "rl_seeds.png",
                "tokenizer_prefix_psnr.png", "rl_reward.png", "training_losses.png"}


def tiny(**sections: dict) -> object:
    """The tiny preset with fewer training steps: evaluate needs trained folders, not good ones."""
    raw = load_params(REPO / "presets/tiny.yaml").to_dict()
    raw["prepare"].update(max_images=200)  # 20 val images: FID below stays at seconds
    raw["judge"].update(steps=20)
    raw["tokenizer"].update(steps=10)
    raw["generator"].update(steps=10)
    raw["rl"].update(steps=2, eval_every=0, seeds=[0, 1])  # two RL seeds: the seeds section
    for name, values in sections.items():
        raw[name].update(values)
    return build_params(raw)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ray_local) -> dict[str, Path]:
    """prepare -> judge -> tokenizer -> cache -> generator -> rl once for the module."""
    root = tmp_path_factory.mktemp("evaluate")
    d = {k: root / k for k in ("prepared", "judge", "tokenizer", "cache", "generator", "rl",
                               "plots")}
    params = tiny()
    cwd = os.getcwd()
    os.chdir(root)  # checkpoints go under .latentforge/ here
    try:
        prepare.run(params.prepare, out_dir=d["prepared"])
        judge.run(params, out_dir=d["judge"], prepared_dir=d["prepared"])
        tokenizer.run(params, out_dir=d["tokenizer"], prepared_dir=d["prepared"],
                      judge_dir=d["judge"], plot_file=d["plots"] / "tokenizer_prefix_psnr.csv")
        cache.run(params, out_dir=d["cache"], prepared_dir=d["prepared"],
                  tokenizer_dir=d["tokenizer"])
        generator.run(params, out_dir=d["generator"], cache_dir=d["cache"],
                      tokenizer_dir=d["tokenizer"], evaluator_dir=d["judge"].parent / "evaluator",
                      prepared_dir=d["prepared"])
        rl.run(params, out_dir=d["rl"], generator_dir=d["generator"],
               tokenizer_dir=d["tokenizer"], judge_dir=d["judge"], prepared_dir=d["prepared"],
               plot_file=d["plots"] / "rl_reward.csv")
    finally:
        os.chdir(cwd)
    return d


def run_evaluate(d: dict[str, Path], report_dir: Path, params: object = None, **overrides):
    kwargs = {"prepared_dir": d["prepared"], "judge_dir": d["judge"],
              "tokenizer_dir": d["tokenizer"], "generator_dir": d["generator"],
              "rl_dir": d["rl"], "plots_dir": d["plots"], **overrides}
    return evaluate.run(params or tiny(), report_dir=report_dir, **kwargs)


@pytest.fixture(scope="module")
def first(inputs, tmp_path_factory):
    report = tmp_path_factory.mktemp("report") / "evaluate"
    return report, run_evaluate(inputs, report)


def test_report_files_metrics_and_protocol(first):
    report, result = first
    assert {p.name for p in report.iterdir()} == REPORT_FILES
    m = result.metrics
    assert list(m)[:4] == list(evaluate.HEADLINE)  # what `latentforge run` shows
    for key in ("tokenizer.val_psnr", "tokenizer.val_ssim", "tokenizer.rfd_judge",
                "tokenizer.pfd_judge", "real.n", "real.fd_at_n", "real.kid_at_n",
                "real.precision_at_n", "real.recall_at_n"):
        assert key in m, key
    for model in ("base", "rl"):
        for key in ("gfd_eval", "precision", "recall", "eval_accuracy", "is_eval",
                    "reward_mean", "diversity", "nfe", "kid_eval", "kid_eval_std", "fd_at_n",
                    "kid_at_n", "precision_at_n", "recall_at_n"):
            assert f"{model}.{key}" in m, f"{model}.{key}"
    # 95% intervals for the headline metrics, paired ones for the base-vs-RL difference.
    for group in ("base", "rl", "diff"):
        for key in evaluate.INTERVAL_METRICS:
            low, high = m[f"{group}.{key}_ci_low"], m[f"{group}.{key}_ci_high"]
            assert low <= high, (group, key)
    assert m["diff.gfd_eval"] == pytest.approx(m["rl.gfd_eval"] - m["base.gfd_eval"], abs=2e-6)
    # FD-pixels, the check no network takes: bootstrapped and paired like the evaluator's FD,
    # and at the held-out set's count beside the held-out images' own (its floor).
    for group in ("base", "rl", "diff", "rl_seed1", "diff_seed1"):
        assert f"{group}.fd_pixels_ci_low" in m and f"{group}.fd_pixels_ci_high" in m, group
    for key in ("base.fd_pixels", "base.fd_pixels_at_n", "real.fd_pixels_at_n"):
        assert m[key] > 0, key
    assert "seeds.diff_fd_pixels" in m
    # The CFG sweep: both generators at every scale, each one's best operating point.
    for model in ("base", "rl"):
        for scale in ("cfg1", "cfg2"):
            for key in ("eval_accuracy", "gfd_eval", "recall"):
                assert f"sweep_{model}.{scale}_{key}" in m, (model, scale, key)
        best = m[f"best.{model}_cfg_scale"]
        assert best in (1.0, 2.0)
        assert m[f"best.{model}_gfd_eval"] == min(m[f"sweep_{model}.cfg1_gfd_eval"],
                                                  m[f"sweep_{model}.cfg2_gfd_eval"])
        # Every sweep point and the best operating point carry 95% intervals.
        for key in evaluate.SWEEP_INTERVAL_KEYS:
            for point in (f"sweep_{model}.cfg1_{key}", f"sweep_{model}.cfg2_{key}",
                          f"best.{model}_{key}"):
                # Bias-shifted: the interval need not hold its point, only be ordered.
                assert m[f"{point}_ci_low"] <= m[f"{point}_ci_high"], point
    # RL seed 1 beside seed 0 ("rl"): graded like it, paired with the base, aggregated.
    for key in evaluate.INTERVAL_METRICS:
        assert m[f"diff_seed1.{key}"] == pytest.approx(m[f"rl_seed1.{key}"] - m[f"base.{key}"],
                                                       abs=2e-6)
        assert m[f"diff_seed1.{key}_ci_low"] <= m[f"diff_seed1.{key}_ci_high"]
    assert m["seeds.n"] == 2
    for key in ("eval_accuracy", "gfd_eval", "diversity"):
        mean = (m[f"rl.{key}"] + m[f"rl_seed1.{key}"]) / 2
        assert m[f"seeds.mean_{key}"] == pytest.approx(mean, abs=2e-6)
        assert m[f"seeds.diff_{key}"] == pytest.approx(mean - m[f"base.{key}"], abs=4e-6)
        assert m[f"seeds.diff_{key}_ci_low"] <= m[f"seeds.diff_{key}"] <= \
            m[f"seeds.diff_{key}_ci_high"]
    # RL against the base at its best CFG scale, sampled at the evaluation's count.
    assert m["distil.guided_cfg_scale"] == m["best.base_cfg_scale"]
    assert m["distil.seeds"] == 2 and "distil.not_shown_worse" not in m  # needs >= 3 seeds
    assert m["distil.rl_eval_accuracy"] == m["seeds.mean_eval_accuracy"]
    groups = {k.split(".")[0] for k in m}
    assert "rl_seed1" in groups
    # The base is sampled once more only when its best scale is not the evaluation's.
    assert ("guided" in groups) == (m["best.base_cfg_scale"] != m["base.cfg_scale"])
    # Generated and held-out real images compared with the train split at one count.
    protocol = json.loads((report / "protocol.json").read_text())
    assert m["real.n"] == min(protocol["real_set"]["images"], protocol["samples"]["per_generator"])
    assert protocol["reference_set"]["name"] == "prepared train split"
    assert protocol["reference_set"]["images"] > protocol["real_set"]["images"]
    assert all(np.isfinite(v) for v in m.values())
    assert not any("fid" in k for k in m), "FID-named numbers need Inception weights"
    assert m["base.nfe"] == m["rl.nfe"] == 4  # euler, 4 steps in the tiny preset
    assert json.loads(json.dumps(m)) == m  # plain floats: what runner writes for DVC
    assert not any("per_s" in k or "seconds" in k for k in m)
    assert "base.sampling_images_per_s" in result.timings

    text = (report / "report.md").read_text()
    cfg = tiny().evaluate
    for needle in (f"**{cfg.per_class * 10}** samples per generator", f"sampler **{cfg.sampler}**",
                   f"**{cfg.sample_steps}** steps", f"seed **{cfg.seed}**", "**judge**",
                   "**evaluator**", "FD-judge", "held-out real (floor)", "## Protocol",
                   "95% bootstrap intervals", "## CFG sweep", "Best operating points",
                   "## RL seeds", "| **mean of 2** |", "### Does RL distil guidance?",
                   "a claim needs at least 3 seeds",
                   "| FD-pixels (raw pixels, no network) ↓ |",
                   "| FD-pixels at the real set's count ↓ |",
                   "| FD-pixels ↓ (raw pixels, no network; not in the verdict) |",
                   "| metric | base | RL | delta (RL - base) | held-out real (floor) |"):
        assert needle in text, needle
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert set(links) >= REPORT_FILES - {"report.md"}
    assert all((report / link).is_file() for link in links)
    assert "gFID" not in text and "rFID" not in text
    assert "images/s" in result.summary and "](" not in result.summary  # artifact: no links

    protocol = json.loads((report / "protocol.json").read_text())
    assert protocol["samples"]["per_generator"] == cfg.per_class * 10
    assert protocol["feature_network"]["name"] == "evaluator" and protocol["fid"] is None
    assert protocol["reward_network"]["name"] == "judge"
    assert protocol["feature_network"]["sha256"] != protocol["reward_network"]["sha256"]
    assert protocol["sampler"] == cfg.sampler and protocol["seed"] == cfg.seed
    assert protocol["samples"]["labels_and_noise"] == "identical for base and RL"
    assert set(protocol["inputs"]) == {"prepared", "judge", "evaluator", "tokenizer", "generator",
                                       "rl", "rl_seed1"}
    assert protocol["rl_seeds"]["seeds"] == [0, 1]


def test_rerun_gives_identical_metrics_and_report_bytes(inputs, first, tmp_path):
    report, result = first
    again = run_evaluate(inputs, tmp_path / "evaluate")
    assert json.dumps(again.metrics, sort_keys=True) == json.dumps(result.metrics, sort_keys=True)
    for name in sorted(REPORT_FILES):
        assert (tmp_path / "evaluate" / name).read_bytes() == (report / name).read_bytes(), name


def test_fid_with_local_inception_weights(inputs, tmp_path, monkeypatch):
    import torch

    from latentforge import inception

    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(inception.FIDInceptionV3().state_dict(), weights)
    # Plumbing, not the value: at 75x75 (Inception's smallest input) the network costs ~1/16
    # of 299x299 on CPU, which keeps this test at seconds.
    monkeypatch.setattr(inception, "INPUT_SIZE", 75)
    params = tiny(evaluate={"per_class": 2, "inception_weights": str(weights)})
    result = run_evaluate(inputs, tmp_path / "evaluate", params,
                          plots_dir=tmp_path / "no-plots")
    m = result.metrics
    for key in ("tokenizer.rfid", "base.gfid", "rl.gfid"):
        assert np.isfinite(m[key]), key
    assert m["protocol.samples_per_generator"] == 20
    protocol = json.loads((tmp_path / "evaluate/protocol.json").read_text())
    assert protocol["fid"]["weights_sha256"] == protocol["inputs"]["inception"]["sha256"]
    text = (tmp_path / "evaluate/report.md").read_text()
    assert "gFID" in text and "rFID" in text
    # A missing reward curve is reported, not fatal.
    assert not (tmp_path / "evaluate/rl_reward.png").exists()
    assert "No RL reward curve" in text


def test_missing_inputs_fail_with_the_path(inputs, tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent-rl"))):
        run_evaluate(inputs, tmp_path / "evaluate", rl_dir=tmp_path / "absent-rl")
    with pytest.raises(DataError, match="rl stage"):
        run_evaluate(inputs, tmp_path / "evaluate", rl_dir=tmp_path / "absent-rl")
    empty = tmp_path / "empty-judge"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty / "judge.json"))):
        run_evaluate(inputs, tmp_path / "evaluate", judge_dir=empty)
    params = tiny(evaluate={"inception_weights": str(tmp_path / "nowhere.pth")})
    with pytest.raises(ConfigError, match="nowhere.pth': no such local file"):
        run_evaluate(inputs, tmp_path / "evaluate", params)
    assert not (tmp_path / "evaluate").exists()  # nothing half-written



def test_generated_samples_are_graded_by_the_evaluator_not_the_reward_judge(inputs, first,
                                                                            tmp_path):
    """The same samples scored by each network: evaluate's gFD-eval and accuracy are the
    evaluator's, not the judge's; and an evaluator with the judge's weights is refused."""
    import shutil

    from latentforge import flow
    from latentforge.data import load_prepared

    _, result = first
    params = tiny()
    cfg = params.evaluate
    handle = generator.load_generator(inputs["generator"], inputs["tokenizer"])
    labels = flow.balanced_labels(len(handle.class_names), cfg.per_class).numpy()
    _, images, _ = generator.sample(handle, labels, seed=cfg.seed, steps=cfg.sample_steps,
                                    cfg_scale=evaluate.cfg_scale_for("base", handle, params),
                                    sampler=cfg.sampler, compute=params.compute)
    train_x, _ = (np.asarray(a) for a in load_prepared(inputs["prepared"]).split("train"))
    graded = {}
    for name in ("judge", "evaluator"):
        net = judge.load_judge(inputs["judge"].parent / name)
        graded[name] = generator.score_samples(net, images, labels, net.score(train_x)[0])
    reported = result.metrics["base.gfd_eval"]
    assert reported == pytest.approx(graded["evaluator"]["gfd_eval"], rel=1e-4)
    assert abs(reported - graded["judge"]["gfd_eval"]) > 1e-3 * reported
    assert result.metrics["base.eval_accuracy"] == pytest.approx(
        graded["evaluator"]["eval_accuracy"], abs=1e-6)

    copy = tmp_path / "evaluator-is-judge"
    shutil.copytree(inputs["judge"], copy)
    with pytest.raises(DataError, match="same weights as the reward judge"):
        run_evaluate(inputs, tmp_path / "evaluate", evaluator_dir=copy)
    assert not (tmp_path / "evaluate").exists()


def test_bootstrap_intervals_match_a_known_case_and_pair_the_difference() -> None:
    """Mean reward of 1000 N(0, 1) draws: the interval is mean +- 1.96 / sqrt(1000) (within
    bootstrap noise); a second set equal to the first plus 0.1 differs by exactly 0.1 in every
    paired replicate, although either set's own interval is ten times wider than that."""
    rng = np.random.default_rng(0)
    n, classes = 1000, 10
    labels = np.repeat(np.arange(classes), n // classes)
    feats = rng.normal(size=(n, 4))
    logp = np.log(np.full((n, classes), 1.0 / classes))
    base = evaluate.PerSample(feats, logp, rng.normal(size=n))
    shifted = evaluate.PerSample(feats, logp, base.rewards + 0.1)
    out = evaluate.bootstrap_intervals(rng.normal(size=(500, 4)), {"base": base, "rl": shifted},
                                       labels, seed=1, replicates=400)
    half_width = (out["base"]["reward_mean_ci_high"] - out["base"]["reward_mean_ci_low"]) / 2
    assert half_width == pytest.approx(1.96 / np.sqrt(n), rel=0.15)
    assert out["base"]["reward_mean_ci_low"] < base.rewards.mean() < out["base"][
        "reward_mean_ci_high"]
    assert out["diff"]["reward_mean_ci_low"] == pytest.approx(0.1, abs=1e-12)
    assert out["diff"]["reward_mean_ci_high"] == pytest.approx(0.1, abs=1e-12)
    assert out["diff"]["gfd_eval_ci_low"] == out["diff"]["gfd_eval_ci_high"] == 0.0  # same feats
    assert out["base"]["gfd_eval_ci_high"] > out["base"]["gfd_eval_ci_low"] >= 0  # clipped at 0


def test_the_bootstraps_shared_reference_fd_is_metrics_fd() -> None:
    rng = np.random.default_rng(0)
    ref, gen = rng.normal(size=(300, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    fd = intervals.Reference(ref).fd(gen)
    assert fd == pytest.approx(intervals.metrics.fd_from_features(ref, gen), rel=1e-9)
