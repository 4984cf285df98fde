"""Decoder post-training: only the decoder trains, generator-made latents (SDEdit on the flow
path, re-drawn codes for maskgit/ar), applying a post-trained decoder and its checks, then the
stage on the tiny preset (outputs, metrics with intervals, the off switch) and evaluate decoding
with its output."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from chain import train_through_generator

from latentforge import flow, tokens
from latentforge.config import Params, build_params, load_params
from latentforge.data import load_prepared
from latentforge.errors import ConfigError, DataError
from latentforge.models.generator import FlowTransformer, generator_config
from latentforge.models.token_generator import TokenTransformer, token_generator_config
from latentforge.models.tokenizer import Tokenizer, tokenizer_config
from latentforge.tasks import evaluate, posttrain, rl
from latentforge.tasks.generator import GeneratorHandle
from latentforge.tasks.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny(**posttrain_overrides: Any) -> Params:
    raw = load_params(REPO / "presets/tiny.yaml").to_dict()
    raw["posttrain"].update({"enabled": True, "steps": 30, "batch_size": 32, "warmup_steps": 5,
                             "save_every": 30, "log_every": 10, "eval_per_class": 10,
                             **posttrain_overrides})
    return build_params(raw)


# ------------------------------------------------------------------------------ unit tests


def test_only_the_decoder_trains() -> None:
    torch.manual_seed(0)
    cfg = tokenizer_config("tiny", image_size=8, channels=1, patch_size=4, num_tokens=4,
                           token_dim=4)
    model = posttrain.DecoderOnly(Tokenizer(cfg))
    before = {k: v.clone() for k, v in model.tokenizer.state_dict().items()}
    trainable = {n for n, p in model.tokenizer.named_parameters() if p.requires_grad}
    assert trainable and all(posttrain.is_decoder_key(n) for n in trainable)
    assert any(n.startswith("encoder") for n, _ in model.tokenizer.named_parameters())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        z = model.tokenizer.encode(x).latents
    for _ in range(3):
        opt.zero_grad()
        (model(z) - x).square().mean().backward()
        opt.step()
    after = model.tokenizer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(posttrain.is_decoder_key(k) for k in changed)
    assert set(posttrain.decoder_state(model.tokenizer)) == {
        k for k in after if posttrain.is_decoder_key(k)}


def flow_handle(seed: int = 0) -> SimpleNamespace:
    torch.manual_seed(seed)
    model = FlowTransformer(generator_config("tiny", num_tokens=4, token_dim=3, num_classes=5))
    with torch.no_grad():  # random weights: the real init predicts a zero velocity
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return SimpleNamespace(model=model.eval(), shift=torch.full((3,), 0.5),
                           scale=torch.full((3,), 2.0))


def test_sdedit_strength_zero_keeps_the_latent_and_one_is_a_fresh_euler_sample() -> None:
    handle = flow_handle()
    latents, labels = torch.randn(4, 4, 3), torch.tensor([0, 1, 2, 3])
    noise = torch.randn(4, 4, 3)
    kept = posttrain.regenerate_flow(handle, latents, labels, torch.zeros(4), noise, 5, 1.5)
    torch.testing.assert_close(kept, latents)
    fresh = posttrain.regenerate_flow(handle, latents, labels, torch.ones(4), noise, 5, 1.5)
    reference, _ = flow.ode_sample(
        lambda x, t: handle.model.forward_with_cfg(x, t, labels, 1.5), noise, 5, "euler")
    torch.testing.assert_close(fresh, reference * handle.scale + handle.shift)
    # Per-sample strengths: each row as if alone; more strength moves the latent further.
    mixed = posttrain.regenerate_flow(handle, latents, labels, torch.tensor([0.0, 1.0, 0.3, 0.8]),
                                      noise, 5, 1.5)
    torch.testing.assert_close(mixed[:2], torch.stack([kept[0], fresh[1]]))
    gap = (mixed - latents).flatten(1).norm(dim=1)
    assert gap[3] > gap[2] > 0


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_regenerated_codes_keep_all_but_the_chosen_count(kind: str) -> None:
    k, v = 8, 7
    torch.manual_seed(0)
    model = TokenTransformer(token_generator_config("tiny", kind=kind, num_tokens=k,
                                                    vocab_size=v, num_classes=3)).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)
    handle = SimpleNamespace(model=model, kind=kind, meta={"sampling": {"temperature": 1.0}})
    codes = torch.randint(0, v, (16, k))
    labels = torch.arange(16) % 3
    strength = torch.linspace(0, 1, 16)
    out = posttrain.regenerate_codes(handle, codes, labels, strength,
                                     tokens.SampleNoise(range(16), 3), 2.0)
    assert out.shape == codes.shape and int(out.min()) >= 0 and int(out.max()) < v
    changed = (out != codes).sum(1)
    chosen = (strength * k).round().long()
    assert (changed <= chosen).all() and changed[0] == 0 and changed[-1] > 0
    again = posttrain.regenerate_codes(handle, codes, labels, strength,
                                       tokens.SampleNoise(range(16), 3), 2.0)
    assert torch.equal(out, again)  # (seed, index) decide every draw


def test_vq_codes_made_by_maskgit_become_latents_without_gradients() -> None:
    """vq's codebook is a parameter: the code -> latent lookup must not track gradients."""
    torch.manual_seed(0)
    k, v = 4, 16
    tok = Tokenizer(tokenizer_config("tiny", image_size=8, channels=1, patch_size=4,
                                     num_tokens=k, token_dim=4, quantizer="vq",
                                     codebook_size=v))
    model = TokenTransformer(token_generator_config("tiny", kind="maskgit", num_tokens=k,
                                                    vocab_size=v, num_classes=3)).eval()
    handle = SimpleNamespace(model=model, kind="maskgit", device=torch.device("cpu"),
                             meta={"sampling": {"temperature": 1.0}},
                             tokenizer=SimpleNamespace(model=tok))
    codes = np.random.default_rng(0).integers(0, v, (5, k))
    with torch.no_grad():
        own = tok.codes_to_latents(torch.as_tensor(codes)).numpy()
    made, strength = posttrain.make_latents(handle, own, codes, np.arange(5) % 3,
                                            tiny().posttrain, seed=1, flow_steps=2)
    assert made.shape == own.shape and np.isfinite(made).all() and len(strength) == 5


def test_posttrain_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="strength_min"):
        tiny(strength_min=0.7, strength_max=0.5)
    with pytest.raises(ConfigError, match="fraction"):
        tiny(generated_fraction=0.8, perturbed_fraction=0.4)


# ------------------------------------------------------------------------- the stage, tiny


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, ray_local) -> Path:
    """prepare -> judge -> tokenizer -> cache -> generator -> posttrain on the tiny preset."""
    root = train_through_generator(tmp_path_factory.mktemp("posttrain"), tiny())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the stage's checkpoints land here
        result = run_posttrain(root, tiny(), root / "decoder")
    (root / "result.json").write_text(json.dumps({"metrics": result.metrics,
                                                  "summary": result.summary}))
    return root


def run_posttrain(root: Path, params: Params, out: Path) -> Any:
    return posttrain.run(params, out_dir=out, generator_dir=root / "generator",
                         tokenizer_dir=root / "tokenizer", evaluator_dir=root / "evaluator",
                         prepared_dir=root / "prepared")


def test_stage_writes_the_decoder_and_before_after_metrics(tiny_inputs: Path) -> None:
    out = tiny_inputs / "decoder"
    result = json.loads((tiny_inputs / "result.json").read_text())
    m = result["metrics"]
    assert {p.name for p in out.iterdir()} == {"decoder.safetensors", "decoder.json",
                                               "train_curve.csv", "before_after.png"}
    meta = json.loads((out / "decoder.json").read_text())
    tok = load_tokenizer(tiny_inputs / "tokenizer")
    assert meta["enabled"] and meta["tokenizer_sha256"] == tok.sha256
    assert meta["params"]["steps"] == 30 and meta["metrics"] == m
    for name in ("gfd_eval_before", "gfd_eval_after", "gfd_eval_diff", "eval_accuracy_diff"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], name
    assert m["gfd_eval_diff"] == pytest.approx(m["gfd_eval_after"] - m["gfd_eval_before"],
                                               abs=1e-5)
    assert m["gfd_improved"] == float(m["gfd_eval_diff_ci_high"] < 0)
    assert m["gfd_val_improved"] == float(m["gfd_val_diff_ci_high"] < 0)
    assert m["gfd_val_before_ci_low"] <= m["gfd_val_before"] <= m["gfd_val_before_ci_high"]
    assert m["val_images"] > 0 and m["gfd_val_before"] != m["gfd_eval_before"]
    assert m["samples"] == 10 * 10 and m["latent_gap"] > 0
    assert "| gFD-eval (held-out val, " in result["summary"]
    rows = (out / "train_curve.csv").read_text().splitlines()
    assert len(rows) > 2 and "loss" in rows[0]


def test_apply_decoder_swaps_only_the_decoder_and_checks_the_tokenizer(tiny_inputs: Path,
                                                                     tmp_path: Path) -> None:
    out = tiny_inputs / "decoder"
    own, tuned = (load_tokenizer(tiny_inputs / "tokenizer") for _ in range(2))
    assert posttrain.apply_decoder(tuned, out) is tuned and tuned.meta["decoder"]["posttrained"]
    a, b = own.model.state_dict(), tuned.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not posttrain.is_decoder_key(k))
    assert any(not torch.equal(a[k], b[k]) for k in a if posttrain.is_decoder_key(k))
    x = np.asarray(load_prepared(tiny_inputs / "prepared").split("val")[0][:3])
    np.testing.assert_array_equal(own.encode(x)["latents"], tuned.encode(x)["latents"])

    # Off, or missing: the tokenizer's own decoder.
    off = tmp_path / "off"
    off.mkdir()
    (off / "decoder.json").write_text(json.dumps({"enabled": False}))
    same = load_tokenizer(tiny_inputs / "tokenizer")
    for folder in (off, tmp_path / "missing", None):
        posttrain.apply_decoder(same, folder)
        assert "decoder" not in same.meta
    # Another tokenizer's decoder, missing weights, wrong tensors: a DataError naming the folder.
    def damage(meta: dict, folder: Path) -> None:
        weights = folder / "decoder.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])

    def truncate(meta: dict, folder: Path) -> None:  # and record the damaged file's digest
        damage(meta, folder)
        meta["sha256"] = hashlib.sha256((folder / "decoder.safetensors").read_bytes()).hexdigest()

    for name, edit in (("other", lambda meta, d: meta.update(tokenizer_sha256="0" * 64)),
                       ("noweights", lambda meta, d: (d / "decoder.safetensors").unlink()),
                       ("damaged", damage), ("truncated", truncate), ("garbled", None)):
        bad = tmp_path / name
        bad.mkdir()
        for f in ("decoder.json", "decoder.safetensors"):
            (bad / f).write_bytes((out / f).read_bytes())
        meta = json.loads((bad / "decoder.json").read_text())
        if edit is None:
            (bad / "decoder.json").write_text("{not json")
        else:
            edit(meta, bad)
            (bad / "decoder.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match=name):
            posttrain.apply_decoder(load_tokenizer(tiny_inputs / "tokenizer"), bad)


def test_disabled_stage_writes_only_the_marker(tiny_inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "decoder"
    result = run_posttrain(tiny_inputs, tiny(enabled=False), out)
    assert result.metrics == {"enabled": 0}
    assert [p.name for p in out.iterdir()] == ["decoder.json"]
    tok = load_tokenizer(tiny_inputs / "tokenizer")
    assert "decoder" not in posttrain.apply_decoder(tok, out).meta


def test_rl_and_evaluate_decode_with_the_posttrained_decoder(tiny_inputs: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root, params = tiny_inputs, tiny()
    decoder_sha = json.loads((root / "decoder" / "decoder.json").read_text())["sha256"]
    rl.run(params, out_dir=tmp_path / "rl", generator_dir=root / "generator",
           tokenizer_dir=root / "tokenizer", judge_dir=root / "judge",
           prepared_dir=root / "prepared", plot_file=tmp_path / "rl.csv")
    rl_meta = json.loads((tmp_path / "rl" / "generator.json").read_text())
    assert rl_meta["rl"]["decoder_sha256"] == decoder_sha
    evaluate.run(params, report_dir=tmp_path / "report", prepared_dir=root / "prepared",
                          judge_dir=root / "judge", tokenizer_dir=root / "tokenizer",
                          generator_dir=root / "generator", rl_dir=tmp_path / "rl",
                          plots_dir=tmp_path / "plots")
    protocol = json.loads((tmp_path / "report" / "protocol.json").read_text())
    assert protocol["decoder"]["sha256"] == decoder_sha
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"sha256 {decoder_sha[:12]}" in report
    # The RL model learned through the post-trained decoder: grading it through the tokenizer's
    # own (posttrain turned off since, rl not rerun) is refused, naming both.
    off = tmp_path / "off"
    off.mkdir()
    (off / "decoder.json").write_text(json.dumps({"enabled": False}))
    with pytest.raises(DataError, match=r"fine-tuned decoding with the post-trained decoder "
                       rf"{decoder_sha[:12]}, but evaluate would decode with the tokenizer's own"):
        evaluate.run(params, report_dir=tmp_path / "report2", prepared_dir=root / "prepared",
                     judge_dir=root / "judge", tokenizer_dir=root / "tokenizer",
                     generator_dir=root / "generator", rl_dir=tmp_path / "rl",
                     plots_dir=tmp_path / "plots", decoder_dir=off)
    assert not (tmp_path / "report2").exists()


def test_sample_command_decodes_with_the_pipelines_decoder_unless_told(tiny_inputs: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch, capsys) -> None:
    from latentforge.cli import main

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_inputs / "decoder", tmp_path / "artifacts" / "decoder")
    common = ["sample", "--class", "3", "--n", "4", "--steps", "3", "--model",
              str(tiny_inputs / "generator"), "--tokenizer", str(tiny_inputs / "tokenizer")]
    grids = {}
    for name, extra in (("default", []), ("explicit", ["--decoder", "artifacts/decoder"]),
                        ("none", ["--decoder", "none"])):
        assert main([*common, *extra, "--out", f"{name}.png"]) == 0, capsys.readouterr().err
        grids[name] = (tmp_path / f"{name}.png").read_bytes()
    assert grids["default"] == grids["explicit"] != grids["none"]
    # A decoder of another tokenizer: refused, naming the folder; no picture.
    other = tmp_path / "other"
    shutil.copytree(tiny_inputs / "decoder", other)
    meta = json.loads((other / "decoder.json").read_text())
    (other / "decoder.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    capsys.readouterr()
    assert main([*common, "--decoder", str(other), "--out", "bad.png"]) != 0
    assert str(other) in capsys.readouterr().err and not (tmp_path / "bad.png").exists()
    # A folder that is no posttrain output (a typo): refused, not silently ignored.
    assert main([*common, "--decoder", "artifacts/decodr", "--out", "bad.png"]) == 2
    assert "--decoder artifacts/decodr: no artifacts/decodr/decoder.json" in \
        capsys.readouterr().err


def test_every_model_folder_file_has_the_mode_the_umask_gives(tiny_inputs: Path) -> None:
    """safetensors' save_file made the weights 0600 (unreadable to teammates, another uid, a
    web server) while every other output followed the umask."""
    from latentforge.storage import process_umask

    expected = 0o666 & ~process_umask()
    modes = {str(f.relative_to(tiny_inputs)): f.stat().st_mode & 0o777
             for folder in ("judge", "evaluator", "tokenizer", "generator", "decoder")
             for f in (tiny_inputs / folder).iterdir()}
    assert "generator/model.safetensors" in modes and "decoder/decoder.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != expected} == {}


def test_sample_command_samples_as_the_model_was_measured(tiny_inputs: Path, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    """CFG, steps and sampler as the model's stage recorded them; the pipeline's decoder only
    where it was post-trained for this generator."""
    from latentforge.cli import main

    monkeypatch.chdir(tmp_path)
    gen, decoder = tmp_path / "generator", tmp_path / "artifacts" / "decoder"
    shutil.copytree(tiny_inputs / "generator", gen)
    shutil.copytree(tiny_inputs / "decoder", decoder)
    meta = json.loads((gen / "generator.json").read_text())
    meta["sample_defaults"] = {"steps": 3, "sampler": "heun", "cfg_scale": 3.0}
    (gen / "generator.json").write_text(json.dumps(meta))
    common = ["sample", "--class", "3", "--n", "4", "--model", str(gen), "--tokenizer",
              str(tiny_inputs / "tokenizer")]
    as_recorded = ["--cfg", "3", "--steps", "3", "--sampler", "heun"]
    # What reaches the sampler: this tiny generator is barely class-conditional (CFG 2 and 3
    # move its latents by <0.01), so two grids may round to the same pixels on some CPU kernels.
    asked: list[dict[str, Any]] = []
    real_sample_images = GeneratorHandle.sample_images

    def sample_images(self: GeneratorHandle, labels: np.ndarray, **kwargs: Any) -> np.ndarray:
        asked.append(kwargs)
        return real_sample_images(self, labels, **kwargs)

    monkeypatch.setattr(GeneratorHandle, "sample_images", sample_images)

    def grid(name: str, *extra: str) -> tuple[bytes, str]:
        assert main([*common, *extra, "--out", f"{name}.png"]) == 0, capsys.readouterr().err
        return (tmp_path / f"{name}.png").read_bytes(), capsys.readouterr().out

    recorded, line = grid("recorded")
    assert "(CFG 3, 3 heun steps, seed 0; decoded by the decoder post-trained for this " \
           "generator" in line
    assert asked[-1] == {"seed": 0, "steps": 3, "sampler": "heun", "cfg_scale": 3.0}
    assert grid("explicit", *as_recorded)[0] == recorded
    assert "CFG 2, 3 heun steps" in grid("cfg2", "--cfg", "2")[1]
    assert asked[-1] == {"seed": 0, "steps": 3, "sampler": "heun", "cfg_scale": 2.0}
    # A folder saved before the record: params.yaml's generator section (here its defaults).
    del meta["sample_defaults"]
    (gen / "generator.json").write_text(json.dumps(meta))
    assert "CFG 1.5, 25 heun steps" in grid("old")[1]
    # A decoder post-trained for another generator is not this one's: the tokenizer's own.
    decoder_meta = json.loads((decoder / "decoder.json").read_text())
    (decoder / "decoder.json").write_text(json.dumps({**decoder_meta,
                                                      "generator_sha256": "0" * 64}))
    mine, line = grid("other_decoder", *as_recorded)
    assert mine == grid("own", *as_recorded, "--decoder", "none")[0] != recorded
    assert "decoded by the tokenizer's own decoder)" in line


def test_a_registered_rl_model_decodes_through_the_decoder_it_was_tuned_with(
        tiny_inputs: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from latentforge import tracking
    from latentforge.cli import main
    from latentforge.config import TrackingConfig

    root, store = tiny_inputs, tmp_path / "store"
    store.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.start_run(TrackingConfig(), "rl", {}, root=store) as tracker:
        rl.run(tiny(), out_dir=tmp_path / "rl", generator_dir=root / "generator",
               tokenizer_dir=root / "tokenizer", judge_dir=root / "judge",
               prepared_dir=root / "prepared", plot_file=tmp_path / "rl.csv", tracker=tracker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(store))
    elsewhere = tmp_path / "elsewhere"  # no artifacts/decoder here: only the registry has it
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    common = ["sample", "--class", "3", "--n", "4", "--steps", "3"]
    registered = [*common, "--model", "models:/latentforge-generator-rl/1"]
    local = [*common, "--model", str(tmp_path / "rl"), "--tokenizer", str(root / "tokenizer")]
    grids = {}
    for name, args in (("registered", registered), ("registered_own", [*registered, "--decoder",
                                                                        "none"]),
                       ("local", [*local, "--decoder", str(root / "decoder")]),
                       ("local_own", [*local, "--decoder", "none"])):
        assert main([*args, "--out", f"{name}.png"]) == 0, capsys.readouterr().err
        grids[name] = (elsewhere / f"{name}.png").read_bytes()
    assert grids["registered"] == grids["local"] != grids["local_own"] == grids["registered_own"]
    # The local RL folder where its decoder is not: the tokenizer's own, and a warning saying so;
    # where it is (the workspace's artifacts/decoder), that one.
    assert main([*local, "--out", "local_default.png"]) == 0
    assert "fine-tuned through post-trained decoder" in capsys.readouterr().err
    assert (elsewhere / "local_default.png").read_bytes() == grids["local_own"]
    shutil.copytree(root / "decoder", elsewhere / "artifacts" / "decoder")
    assert main([*local, "--out", "local_here.png"]) == 0
    assert "decoded by the post-trained decoder RL fine-tuned through" in capsys.readouterr().out
    assert (elsewhere / "local_here.png").read_bytes() == grids["local"]
