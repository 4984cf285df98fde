"""`run --exp`: DVC gets the checked values as `dvc exp run -S` overrides, and stores exactly
those in params.yaml. Each case goes through DVC's own code (`to_path_overrides`, Hydra's parser,
`apply_overrides`) on a copy of params.yaml, read back with LatentForge's loader: what the
stage would see must be, type for type, the value the checker produced."""

from __future__ import annotations

import logging
import math
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides, to_hydra_overrides

from latentforge.config import (
    build_params,
    load_params,
    parse_override,
    read_params_file,
    write_params_file,
    yaml_text,
)
from latentforge.errors import ConfigError
from latentforge.overrides import (
    dvc_set_params,
    dvc_set_params_checked,
    hydra_value,
    same_value,
)
from latentforge.schema import as_overrides

# Strings that broke on the way to DVC (audit), that YAML 1.1 reads as something else, and
# characters special to Hydra, OmegaConf or YAML.
NASTY = ["é", "naïve☃", "😀", "a\\b", "a\\\\b", "back\\", "\\", "C:\\new\\table", "'", "\\'",
         "it's", 'say "hi"', "${oc.env:HOME}", "${x}", "\\${x}", "\\\\${x}", "$${x}", "${",
         "a,b", "k=v", "#", "a #b", "#tag", "", " ", "  padded  ", "tab\there", "line\nbreak",
         "end\\\n", "cr\rlf", "[x]", "{x}", "x: y", "- x", "~", "*glob", "choice(a,b)",
         "null", "None", "true", "123", "1e3", ".inf", "nan", "on", "yes", "No", "off", "y",
         "1:30", "017", "0o17", "0x10", "2026-01-01", "s3://b/x y,z=1", "\x00\x07\x7f", "\ufeff",
         "\u2028", "'''", "\\'\\", "%x", "@x", "!x", "&x", "|", ">", "?"]
# (section.key, value): free-text keys take the strings; the others their own types.
# (A blank experiment name is refused: MLflow needs one.)
CASES = ([("tracking.experiment", s) for s in NASTY if s.strip()]
         + [("prepare.path", s) for s in ("/data/run #3", "C:\\data\\new", "yes")]
         + [("tokenizer.kl_weight", v) for v in (1e-3, 1e-20, 0.1, 1e21, 2.5e-308, 1.0, 0.0)]
         + [("judge.bf16", True), ("judge.bf16", False),  # (an empty form field: no change)
            ("prepare.max_images", 10 ** 9), ("prepare.seed", 2 ** 63 - 1),
            ("rl.seeds", [0, 1, 2, 3, 4, 5]),
            ("rl.seeds", [7]), ("evaluate.cfg_sweep", [1.0, 2e-05, 1e+21]),
            ("evaluate.cfg_sweep", []), ("tracking.artifact_location", "s3://b/m l,x"),
            ("rl.rewards", {"judge_margin": 0.5}),  # a mapping with other keys: replaced
            ("rl.rewards", {"judge_prob": 2.0}),
            ("rl.rewards", {"judge_prob": 1.0, "judge_density": 1e-3}),
            ("rl.rewards", {"my_rewards:fn": 1.0, "pkg.mod:f": 1e-3})])


def dvc_applies(set_params: list[str], params_file: Path) -> dict:
    """What `dvc exp run -S` does with `set_params` to `params_file` (dvc/repo/experiments:
    group by file, refuse sweeps without --queue, apply_overrides), read as the stage reads it."""
    by_file = to_path_overrides(set_params)
    assert list(by_file) == ["params.yaml"], by_file
    assert not any(o.is_sweep_override() for o in to_hydra_overrides(by_file["params.yaml"]))
    apply_overrides(str(params_file), by_file["params.yaml"])
    return read_params_file(params_file)


def stored(raw: dict, key: str) -> object:
    section, name = key.split(".")
    return raw[section][name]


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """The shipped params.yaml with two rewards, so that a mapping must be replaced, not merged."""
    text = (REPO / "params.yaml").read_text()
    assert "rewards: {judge_prob: 1.0}" in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("rewards: {judge_prob: 1.0}",
                                 "rewards: {judge_prob: 1.0, judge_density: 1.0}"))
    return path


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_dvc_stores_the_checked_value_of_a_run_form_change(params_file, key, value):
    section, name = key.split(".")
    overrides = as_overrides({section: {name: value}})
    params = load_params(params_file, overrides)
    checked = stored(params.to_dict(), key)
    assert same_value(checked, value)  # the checker reads the form's text back as sent
    values, set_params = dvc_set_params_checked(params, overrides, params_file)
    assert values == {key: checked}
    raw = dvc_applies(set_params, params_file)
    assert same_value(stored(raw, key), checked), (set_params, stored(raw, key))
    assert same_value(stored(build_params(raw).to_dict(), key), checked)  # as the stage runs


# What a user types after -S (YAML, as in params.yaml) and the value checked and stored.
TYPED = [("tracking.experiment=a\\b", "a\\b"), ("tracking.experiment=é", "é"),
         ("tracking.experiment=${oc.env:HOME}", "${oc.env:HOME}"),
         ("tracking.experiment=a,b", "a,b"), ("tracking.experiment=k=v", "k=v"),
         ("tracking.experiment=on", "on"), ("tracking.experiment=yes", "yes"),
         ("tracking.experiment=No", "No"), ("tracking.experiment=1:30", "1:30"),
         ("tracking.experiment='017'", "017"), ("tracking.experiment=it's", "it's"),
         ("tracking.experiment=\"\\u00e9\"", "é"), ("prepare.seed=017", 17),
         ("tokenizer.kl_weight=1", 1.0), ("prepare.seed=3.0", 3), ("judge.bf16=true", True),
         ("prepare.max_images=", None), ("rl.seeds=[0,1]", [0, 1]),
         ('rl.rewards={"judge_margin": 1.0}', {"judge_margin": 1.0}),
         ("rl.rewards.judge_margin=0.5", {"judge_prob": 1.0, "judge_density": 1.0,
                                          "judge_margin": 0.5})]


@pytest.mark.parametrize(("typed", "expected"), TYPED, ids=[t for t, _ in TYPED])
def test_dvc_stores_the_checked_value_of_a_typed_change(params_file, typed, expected):
    key = typed.split("=")[0].removesuffix(".judge_margin")
    params = load_params(params_file, [typed])
    assert same_value(stored(params.to_dict(), key), expected)
    values, set_params = dvc_set_params_checked(params, [typed], params_file)
    assert same_value(values[key], expected)
    assert same_value(stored(dvc_applies(set_params, params_file), key), expected), set_params


def test_yaml_1_1_booleans_and_numbers_stay_strings_where_written(params_file):
    """'on', 'yes', 'No', '1:30', '017' as an experiment's tracking.experiment and as a
    `latentforge run -S` one: DVC's ruamel and LatentForge's writer both leave 'on' unquoted
    (YAML 1.2 allows it); the stage reads params.yaml as YAML 1.2 too, so it sees the string."""
    original = params_file.read_bytes()
    for text in ("on", "yes", "No", "1:30", "017"):
        params_file.write_bytes(original)
        overrides = [f"tracking.experiment={yaml_text(text)}"]
        params = load_params(params_file, overrides)
        _, set_params = dvc_set_params_checked(params, overrides, params_file)
        assert load_params(dvc_applies(set_params, params_file) and params_file
                           ).tracking.experiment == text
        params_file.write_bytes(original)
        write_params_file(params, params_file)
        assert load_params(params_file).tracking.experiment == text


def test_a_mapping_is_replaced_and_missing_keys_are_added(params_file):
    """rl.rewards lacks the new reward and holds one the change drops; tracking.experiment is
    not in the file at all (load_params gives its default); prepare.max_images is null."""
    text = params_file.read_text()
    params_file.write_text(text.replace("  experiment: latentforge", "  # no experiment key"))
    values = {"rl.rewards": {"judge_margin": 0.5, "a.b:c d": 2.0},
              "tracking.experiment": "x y", "prepare.max_images": 100}
    set_params = dvc_set_params(values, read_params_file(params_file))
    assert set_params == ["~rl.rewards", "+rl.rewards={judge_margin: 0.5, a.b\\:c\\ d: 2.0}",
                          "+tracking.experiment='x y'", "+prepare.max_images=100"]
    raw = dvc_applies(set_params, params_file)
    for key, value in values.items():
        assert same_value(stored(raw, key), value)
    assert "# reward name -> weight" in params_file.read_text()  # the key's comment stays


def test_random_strings_are_stored_as_they_are(tmp_path):
    """A seeded few hundred strings from characters special somewhere on the way, as values
    and inside lists, in one params.yaml; each also survives the Run form's YAML text."""
    rnd = random.Random(0)
    alphabet = [*"ab \\'\"$\\{}[](),:=#~*é☃\t\n\r%?|@!&-.0`", "${", "\\${", "\\\\", "😀",
                "\u2028", "\x00", "\x7f", "???", "null", "yes", "${oc.env:HOME}"]
    values: dict[str, object] = {}
    for i in range(400):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10)))
        values[f"fuzz.k{i}"] = text if text != "???" else "?"
        if i % 10 == 0:
            values[f"fuzz.l{i}"] = [text, rnd.uniform(-1, 1) * 10.0 ** rnd.randint(-30, 30),
                                    rnd.randint(-10 ** 20, 10 ** 20), None, False]
    path = tmp_path / "params.yaml"
    path.write_text("fuzz:\n" + "".join(f"  k{i}: old\n" for i in range(0, 400, 2)))
    set_params = dvc_set_params(values, read_params_file(path))
    raw = dvc_applies(set_params, path)
    bad = [(v, stored(raw, k)) for k, v in values.items() if not same_value(stored(raw, k), v)]
    assert not bad, bad[:5]
    for key, value in values.items():
        _, back = parse_override(f"{key}={yaml_text(value)}")
        assert same_value(back, value), (value, back)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_float_has_no_dvc_form(bad):
    with pytest.raises(ConfigError, match=r"tokenizer\.kl_weight = .* is not a finite number"):
        hydra_value(bad, "tokenizer.kl_weight")
    with pytest.raises(ConfigError, match=r"evaluate\.cfg_sweep\[1\] = .* not a finite number"):
        dvc_set_params({"evaluate.cfg_sweep": [1.0, bad]}, {})


@pytest.mark.parametrize(("value", "why"), [
    ({"rl.rewards": {"mod:fé": 1.0}}, "cannot hold 'é'"),
    ({"rl.rewards": {"1": 1.0}}, "number, bool or null"),
    ({"tracking.experiment": "???"}, "missing value"),
    ({"tracking.experiment": "a\x85b"}, "NEL")])
def test_what_dvc_cannot_store_is_refused_naming_the_key(value, why):
    (key,) = value
    with pytest.raises(ConfigError, match=why) as err:
        dvc_set_params(value, {})
    assert str(err.value).startswith(key)


def test_the_experiment_flow_sends_dvc_only_the_rendered_overrides(params_file, monkeypatch):
    """The flow's body with DVC, MLflow and Prefect's logger stubbed: the command gets the
    rendered overrides, the parent run logs the checked values."""
    from latentforge import dvcops, tracking
    from latentforge.flows import experiment as flow
    from latentforge.schema import form_model

    monkeypatch.chdir(params_file.parent)
    commands, logged = [], {}

    class Run:
        run_id = "r1"
        log_params = staticmethod(logged.update)
        log_metrics = staticmethod(lambda metrics: None)

    @contextmanager
    def start_run(*args, **kwargs):
        yield Run()

    monkeypatch.setattr(flow, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(tracking, "start_run", start_run)
    monkeypatch.setattr(dvcops, "run_dvc", lambda cmd, **kwargs: commands.append(cmd))
    monkeypatch.setattr(flow, "roll_up", lambda parent: {})  # MLflow is stubbed here
    posted = []
    monkeypatch.setattr(flow, "create_markdown_artifact",
                        lambda markdown, **kwargs: posted.append(markdown))
    form = form_model().model_validate({"tracking": {"experiment": "on"}})
    result = flow.experiment.fn("x1", overrides=["rl.rewards={judge_margin: 1.0}"], params=form)
    (cmd,) = commands
    assert cmd == ["exp", "run", "--temp", "-n", "x1", "-S", "tracking.experiment='on'",
                   "-S", "~rl.rewards", "-S", "+rl.rewards={judge_margin: 1.0}"]
    assert logged == {"overrides": "tracking.experiment='on' rl.rewards={judge_margin: 1.0}"}
    assert result["overrides"] == ["tracking.experiment='on'", "rl.rewards={judge_margin: 1.0}"]
    assert posted[0].startswith("## Experiment x1\n\nChanges: `tracking.experiment='on'`, "
                                "`rl.rewards={judge_margin: 1.0}`; ran in ")
    assert "| prepare | **skipped** (up to date) |" in posted[0]  # the copy reused it
    assert "`dvc exp apply x1` brings it into the workspace" in posted[0]
    with pytest.raises(ConfigError, match="cannot hold"):  # before any lock, run or DVC
        flow._experiment("x2", ["rl.rewards={'mod:fé': 1.0}"], False, False)
    assert len(commands) == 1

    Run.run_id = None  # tracking off: no runs to table, and the summary says so
    flow.experiment.fn("x3", overrides=["prepare.seed=4"])
    assert "Not tracked (tracking.enabled is false)" in posted[-1]
    assert "| prepare |" not in posted[-1]
