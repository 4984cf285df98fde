"""Parameters: schema validation, overrides, params files, and the light CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from latentforge.cli import main
from latentforge.config import (
    Params,
    apply_overrides,
    build_params,
    load_params,
    write_params_file,
)
from latentforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_yaml_states_every_default():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert build_params(raw) == Params()
    # every key is spelled out, so DVC tracks the values actually used
    for section, values in Params().to_dict().items():
        assert set(raw[section]) == set(values), section


def test_presets_are_valid():
    presets = sorted((REPO / "presets").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"tiny", "gpu"}
    for p in presets:
        load_params(p)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"prepare": {"resoluton": 8}}, "unknown key 'prepare.resoluton'; did you mean 'prepare.resolution'?"),
    ({"prepar": {}}, "unknown key 'prepar'; did you mean 'prepare'?"),
    ({"compute": {"num_wrokers": 2}}, "did you mean 'compute.num_workers'?"),
    ({"prepare": {"resolution": "big"}}, "prepare.resolution = 'big' is invalid: expected an integer"),
    ({"prepare": {"resolution": 2}}, "prepare.resolution = 2 is out of range: expected >= 4"),
    ({"prepare": {"val_fraction": 1.0}}, "prepare.val_fraction = 1.0 is out of range: expected > 0.0 and < 1.0"),
    ({"prepare": {"val_fraction": 0}}, "prepare.val_fraction = 0.0 is out of range: expected > 0.0 and < 1.0"),
    ({"prepare": {"channels": 2}}, "prepare.channels = 2 is invalid: expected one of 1, 3"),
    ({"prepare": {"source": "mnist"}}, "prepare.source = 'mnist' is invalid: expected one of 'digits'"),
    ({"prepare": {"max_images": 0}}, "prepare.max_images = 0 is out of range: expected >= 1"),
    ({"compute": {"use_gpu": "yes"}}, "compute.use_gpu = 'yes' is invalid: expected true or false"),
    ({"prepare": 3}, "prepare must be a mapping"),
    ({"tokenizer": {"layout": "2d", "register_causal": True}},
     "register_causal = true needs layout 1d"),
    ({"tokenizer": {"nested_dropout_lengths": "pow3"}},
     "tokenizer.nested_dropout_lengths = 'pow3' is invalid: expected one of 'uniform', 'pow2'"),
    ({"tokenizer": {"perturbation_anneal": "exp"}},
     "tokenizer.perturbation_anneal = 'exp' is invalid: expected one of 'none', 'linear', "
     "'cosine'"),
    ({"tokenizer": {"perturbation_images": 1.5}},
     "tokenizer.perturbation_images = 1.5 is out of range: expected >= 0.0 and <= 1.0"),
    ({"tokenizer": {"perturbation_final": -0.1}},
     "tokenizer.perturbation_final = -0.1 is out of range"),
])
def test_bad_parameters_name_key_value_and_allowed(raw, expected):
    with pytest.raises(ConfigError) as err:
        build_params(raw, "my.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("my.yaml")


def test_values_are_coerced_and_null_allowed_where_optional():
    p = build_params({"prepare": {"max_images": None, "resolution": 32.0},
                      "generator": {"cfg_scale": 2}})
    assert p.generator.cfg_scale == 2.0 and isinstance(p.generator.cfg_scale, float)
    assert p.prepare.resolution == 32 and isinstance(p.prepare.resolution, int)
    assert p.prepare.max_images is None


def test_overrides_use_dvc_exp_syntax():
    raw = apply_overrides({"prepare": {"resolution": 16}}, [
        "prepare.resolution=32", "prepare.max_images=null", "compute.ray_address=auto"])
    p = build_params(raw)
    assert p.prepare.resolution == 32 and p.prepare.max_images is None
    assert p.compute.ray_address == "auto"
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["prepare.resolution"])


def test_params_file_layers_on_defaults(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("prepare:\n  resolution: 24\n")
    p = load_params(f, ["prepare.seed=3"])
    assert p.prepare.resolution == 24 and p.prepare.seed == 3
    assert p.compute == Params().compute
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare:\n  seed: [1, 2\n")
    with pytest.raises(ConfigError) as refused:  # one line: where, what, within what
        load_params(bad)
    assert str(refused.value) == (
        f"{bad}: not valid YAML: line 3, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence from line 2, column 9)")
    bad.write_text("prepare:\n\tseed: 3\n")
    with pytest.raises(ConfigError) as refused:
        load_params(bad)
    assert str(refused.value) == (
        f"{bad}: not valid YAML: line 2, column 1: found character '\\t' that cannot start any "
        "token (indent with spaces, not tabs) (while scanning for the next token)")
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_write_params_file_keeps_comments_and_reports_change(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text())
    assert write_params_file(load_params(f), f) is False  # nothing changed
    assert write_params_file(load_params(f, ["prepare.resolution=32"]), f) is True
    text = f.read_text()
    assert "resolution: 32  # square output side" in text
    assert load_params(f).prepare.resolution == 32


def test_cli_exits_2_and_names_the_key(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["params", "-S", "prepare.resoltion=8"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'prepare.resoltion'; did you mean 'prepare.resolution'?" in err
    assert main(["run", "-S", "prepare.channels=5"]) == 2  # nothing runs: no project needed
    assert "prepare.channels = 5" in capsys.readouterr().err


def test_cli_params_prints_resolved_yaml(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["params", "-S", "prepare.resolution=20"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["prepare"]["resolution"] == 20
    assert build_params(printed).prepare.resolution == 20
    assert main(["params", "--explain"]) == 0
    out = capsys.readouterr().out
    # as params.yaml and -S take them (YAML), not as Python writes them (None, True, 'skip')
    assert "prepare.on_bad_image = skip\n" in out and "prepare.resolution = 16\n" in out
    assert "prepare.max_images = null\n" in out and "rl.seeds = [0, 1, 2]\n" in out
    # the values in use (params.yaml, -S) beside the defaults they differ from
    (tmp_path / "params.yaml").write_text("prepare:\n  resolution: 8\n")
    assert main(["params", "--explain", "-S", "prepare.seed=3", "-S", "compute.use_gpu=true"]
                ) == 0
    out = capsys.readouterr().out
    assert "prepare.resolution = 8  (default 16)\n" in out
    assert "prepare.seed = 3  (default 0)\n" in out and "prepare.on_bad_image = skip\n" in out
    assert "compute.use_gpu = true  (default false)\n" in out
    # An invalid params.yaml: the error, then the documentation with the defaults, exit 2.
    (tmp_path / "params.yaml").write_text("prepare:\n  resolution: big\n")
    assert main(["params", "--explain"]) == 2
    captured = capsys.readouterr()
    assert "prepare.resolution = 'big' is invalid" in captured.err
    assert "prepare.resolution = 16\n" in captured.out


@pytest.mark.parametrize("key", ["tracking.artifact_location", "storage.remote",
                                 "evaluate.inception_weights", "compute.ray_address"])
@pytest.mark.parametrize("text", ["None", "none"])
def test_the_text_none_is_not_taken_for_null(key, text, tmp_path, monkeypatch):
    """Copied from Python output, `None` made a folder named None (artifact_location) or
    failed at the last stage (inception_weights)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"{key} = '?{text}'? is the text '{text}', not null: "
                                          r"write null"):
        load_params(None, [f"{key}={text}"])
    section, name = key.split(".")
    assert getattr(getattr(load_params(None, [f"{key}=null"]), section), name) is None


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`latentforge params --explain | head`: the reader leaves early; the command stops as a
    tool stopped by SIGPIPE does, without an error line."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "latentforge", "params", "--explain"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE and err == ""


def test_stage_refuses_overrides_inside_dvc(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "prepare")
    assert main(["stage", "prepare", "-S", "prepare.resolution=8"]) == 2
    assert "come from params.yaml only" in capsys.readouterr().err
    monkeypatch.delenv("DVC_STAGE")
    assert main(["stage", "nosuch"]) == 2


@pytest.mark.parametrize("args", [["--help"], ["params"]])
def test_light_commands_do_not_import_heavy_packages(args):
    code = ("import sys, contextlib, io\nfrom latentforge.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main({args!r})\n"
            "heavy = [m for m in ('torch', 'ray', 'mlflow', 'prefect') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"`latentforge {' '.join(args)}` imported {out}"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "latentforge", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "latentforge" in out and "run" in out


def test_mapping_parameters_are_validated_and_replaced_whole(tmp_path):
    p = build_params({"rl": {"rewards": {"judge_margin": 0.5, "mymod:fn": 2}}})
    assert p.rl.rewards == {"judge_margin": 0.5, "mymod:fn": 2.0}
    with pytest.raises(ConfigError, match="rl.rewards = .* expected a mapping of a string to a number"):
        build_params({"rl": {"rewards": ["judge_margin"]}})
    f = tmp_path / "params.yaml"
    f.write_text((REPO / "params.yaml").read_text())
    assert write_params_file(load_params(f, ["rl.rewards={judge_margin: 1.0}"]), f)
    assert load_params(f).rl.rewards == {"judge_margin": 1.0}


def test_written_lists_and_mappings_keep_their_style_and_comment(tmp_path):
    """-S writes a list or mapping where it was, as it was: flow style on the key's line with
    its comment after it (not a block of items after a blank line), and a block stays a block;
    only the changed lines differ."""
    f = tmp_path / "params.yaml"
    # the shipped file, with cfg_sweep rewritten by the user as a block-style list
    text = (REPO / "params.yaml").read_text().replace(
        "  cfg_sweep: [1.0, 1.25, 1.5, 2.0, 3.0]  #", "  cfg_sweep:\n    - 1.0\n    - 2.0\n  #", 1)
    f.write_text(text)
    assert write_params_file(load_params(f, ["rl.seeds=[0, 1, 2, 3]",
                                             "rl.rewards={judge_prob: 1.0, judge_margin: 0.5}",
                                             "evaluate.cfg_sweep=[1.0, 3.0]"]), f)
    after = f.read_text().splitlines()
    changed = [line for line in after if line not in text.splitlines()]
    assert [line.split("#")[0].rstrip() for line in changed] == [
        "  rewards: {judge_prob: 1.0, judge_margin: 0.5}", "  seeds: [0, 1, 2, 3]", "    - 3.0"]
    assert all("#" in line for line in changed[:2])  # the keys' comments stay on their lines
    p = load_params(f)
    assert p.rl.seeds == [0, 1, 2, 3] and p.evaluate.cfg_sweep == [1.0, 3.0]
    assert p.rl.rewards == {"judge_prob": 1.0, "judge_margin": 0.5}


def test_exponent_floats_read_as_numbers_like_dvc_does(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("tokenizer:\n  lr: 2e-3\n  kl_weight: 1E-4\n")
    p = load_params(f, ["generator.lr=5e-4"])
    assert (p.tokenizer.lr, p.tokenizer.kl_weight, p.generator.lr) == (0.002, 0.0001, 0.0005)


# Plain scalars YAML 1.1 (PyYAML) and 1.2 (DVC's ruamel) read differently, and some they agree on.
SCALARS = ["on", "On", "off", "yes", "Yes", "No", "n", "y", "true", "False", "TRUE", "tRue",
           "1:30", "1:30.5", "017", "0o17", "0x1F", "0b101", "1_000", "-0", "+5", "2e-3", "1E4",
           ".5", "-.5e+3", "1.", ".inf", "-.Inf", ".nan", "null", "Null", "~", "2026-01-01",
           "0.1", "1e999", "1__0", "0o8", "x"]


@pytest.mark.parametrize("text", SCALARS)
def test_plain_scalars_read_as_dvc_reads_them(text):
    """The stage reads params.yaml as DVC does (YAML 1.2): `experiment: on` is the string that
    `dvc exp run -S tracking.experiment='on'` stored, not True as PyYAML's YAML 1.1 has it."""
    import math

    from ruamel.yaml import YAML

    from latentforge.config import yaml_dump, yaml_load

    expected = YAML(typ="safe").load(f"k: {text}\n")["k"]
    got = yaml_load(f"k: {text}\n")["k"]
    same_nan = isinstance(got, float) and math.isnan(got) and math.isnan(expected)
    assert (got == expected and type(got) is type(expected)) or same_nan, (got, expected)
    if isinstance(got, str):  # written back, every reader still sees the string
        assert yaml_load(yaml_dump({"k": got}))["k"] == got
        assert yaml.safe_load(yaml_dump({"k": got}))["k"] == got  # PyYAML's YAML 1.1 too
        assert YAML(typ="safe").load(yaml_dump({"k": got}))["k"] == got


@pytest.mark.parametrize(("preset", "expected"), [(None, "False"), ("true", "True")])
def test_cli_turns_prefect_server_telemetry_off_unless_the_user_set_it(preset, expected,
                                                                          tmp_path):
    # Offline (as here), the temporary Prefect server's start-up telemetry logs an ERROR.
    code = ("import contextlib, io\nfrom latentforge.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['params'])\n"
            "from prefect.settings import get_current_settings\n"
            "print(get_current_settings().server.analytics_enabled)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    if preset is not None:
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = preset
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected
