"""Parameters the schema must refuse before any stage runs (issue 15): non-finite numbers,
sizes that cannot fit a machine, combinations no stage can run, duplicate YAML keys and files
that are not UTF-8 text. Each is a ConfigError naming the key (or file) and the value, and
exit code 2 from the CLI.

The sweeps iterate over every field of the schema, so a key added later is covered without
anyone remembering to add it here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest

from latentforge import config
from latentforge.cli import main
from latentforge.config import Params, build_params, load_params
from latentforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# Integer keys that may stay without an upper bound, with the reason. Empty on purpose: every
# int key today is size-like or a seed, and both have a bound.
UNBOUNDED_INTS: dict[str, str] = {}


def leaf_fields(cls: type = Params, prefix: str = "") -> list[tuple[str, typing.Any, dict]]:
    """(key path, type, metadata) of every parameter, sections recursed into."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp, dict(f.metadata)))
    return out


def base_type(tp: typing.Any) -> tuple[typing.Any, str]:
    """The scalar type of a field and its shape: 'scalar', 'list' or 'dict' (values)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return base_type(inner)
    if origin is list:
        return args[0], "list"
    if origin is dict:
        return args[1], "dict"
    return tp, "scalar"


def shaped(value: typing.Any, shape: str) -> typing.Any:
    return {"scalar": value, "list": [value], "dict": {"judge_logprob": value}}[shape]


def raw_for(key: str, value: typing.Any) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


FIELDS = leaf_fields()
FLOAT_FIELDS = [(k, s) for k, tp, _ in FIELDS for b, s in [base_type(tp)] if b is float]
NUMERIC_FIELDS = [(k, s) for k, tp, _ in FIELDS for b, s in [base_type(tp)] if b in (int, float)]
INT_FIELDS = [(k, s, m) for k, tp, m in FIELDS for b, s in [base_type(tp)] if b is int]


def test_the_sweeps_see_every_kind_of_field():
    keys = {k for k, _ in FLOAT_FIELDS}
    # scalar, optional, mapping-valued and another engineer's section alike
    assert {"generator.lr", "evaluate.cfg_scale", "rl.rewards", "storage.read_timeout"} <= keys
    assert len(FLOAT_FIELDS) >= 30
    ints = {k for k, _, _ in INT_FIELDS}
    assert {"prepare.max_images", "tokenizer.fsq_levels", "storage.retries"} <= ints
    assert "prepare.channels" not in ints  # a Literal: bounded by its options


# --------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize(("key", "shape"), NUMERIC_FIELDS, ids=[k for k, _ in NUMERIC_FIELDS])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_numeric_field_rejects_non_finite_values(key, shape, bad):
    with pytest.raises(ConfigError) as err:
        build_params(raw_for(key, shaped(bad, shape)), "my.yaml")
    msg = str(err.value)
    assert msg.startswith("my.yaml: ") and key in msg and "is not a finite number" in msg
    assert f"= {bad!r} " in msg


@pytest.mark.parametrize(("key", "shape"), FLOAT_FIELDS, ids=[k for k, _ in FLOAT_FIELDS])
def test_every_float_field_rejects_nan_and_inf_from_overrides(key, shape, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: defaults plus the override
    text = {"scalar": "{}", "list": "[{}]", "dict": "{{judge_logprob: {}}}"}[shape]
    # `nan` and `inf` are strings to YAML; `.nan`, `-.inf` and 1e999 are floats.
    for spelled in ("nan", "inf", "-inf", "Infinity", ".nan", ".inf", "-.inf", "1e999"):
        with pytest.raises(ConfigError, match="is not a finite number") as err:
            load_params(None, [f"{key}={text.format(spelled)}"])
        assert key in str(err.value)


def test_non_finite_values_in_a_file_name_the_inner_key(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("rl:\n  rewards: {judge_logprob: 1.0, judge_margin: .nan}\n")
    with pytest.raises(ConfigError, match=r"rl\.rewards\.judge_margin = nan is not a finite"):
        load_params(f)
    f.write_text("tokenizer:\n  quantizer: fsq\n  token_dim: 2\n  fsq_levels: [8, .inf]\n")
    with pytest.raises(ConfigError, match=r"tokenizer\.fsq_levels\[1\] = inf is not a finite"):
        load_params(f)
    f.write_text("generator:\n  lr: -.inf\n")
    with pytest.raises(ConfigError, match=r"generator\.lr = -inf is not a finite number"):
        load_params(f)


def test_text_that_only_looks_non_finite_stays_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_params(None, ["tracking.experiment=nan"]).tracking.experiment == "nan"


# --------------------------------------------------------------------------------- upper bounds


def test_every_int_field_has_an_upper_bound():
    missing = [k for k, _, m in INT_FIELDS
               if m.get("le") is None and m.get("lt") is None and k not in UNBOUNDED_INTS]
    assert not missing, f"give these a le= (or add them to UNBOUNDED_INTS with why): {missing}"
    stale = set(UNBOUNDED_INTS) - {k for k, _, _ in INT_FIELDS}
    assert not stale


BOUNDED_INTS = [(k, s, m) for k, s, m in INT_FIELDS
                if m.get("le") is not None or m.get("lt") is not None]


@pytest.mark.parametrize(("key", "shape", "meta"), BOUNDED_INTS,
                         ids=[k for k, _, _ in BOUNDED_INTS])
def test_every_int_upper_bound_rejects_one_past_it(key, shape, meta):
    past = int(meta["le"]) + 1 if meta.get("le") is not None else int(meta["lt"])
    with pytest.raises(ConfigError) as err:
        build_params(raw_for(key, shaped(past, shape)), "my.yaml")
    assert f"{key} = {shaped(past, shape)!r} is out of range" in str(err.value)


@pytest.mark.parametrize(("key", "value"), [
    ("generator.steps", config.MAX_STEPS),
    ("judge.batch_size", config.MAX_BATCH),
    ("prepare.seed", config.MAX_SEED),
    ("rl.seeds", [config.MAX_SEED]),
    ("prepare.max_images", config.MAX_IMAGES),
    ("tokenizer.codebook_size", config.MAX_CODEBOOK),
    ("compute.num_workers", 1024),  # divides every default batch size
    ("evaluate.per_class", config.MAX_PER_CLASS),
    ("prepare.resolution", config.MAX_SIDE),
])
def test_bounds_themselves_are_allowed(key, value):
    section, name = key.split(".")
    raw = raw_for(key, value)
    if key == "compute.num_workers":
        raw.update({s: {"batch_size": 1024} for s in ("judge", "tokenizer", "generator",
                                                      "posttrain")})
    assert getattr(build_params(raw).section(section), name) == value


def test_a_huge_integer_is_out_of_range_not_a_crash(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("generator:\n  batch_size: 640000000000000000000000\n")
    with pytest.raises(ConfigError, match=r"generator\.batch_size = 640+ is out of range: "
                                          r"expected >= 1 and <= 65536"):
        load_params(f)
    f.write_text("generator:\n  lr: 1" + "0" * 400 + "\n")  # no float holds it
    with pytest.raises(ConfigError, match=r"generator\.lr = 10+\.\.\. \(401 characters\) is "
                                          r"invalid: expected a number"):
        load_params(f)
    f.write_text("generator:\n  steps: " + "1" * 5000 + "\n")  # past Python's int parsing limit
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)


# --------------------------------------------------------------------------- cross-field checks


@pytest.mark.parametrize(("raw", "expected"), [
    ({"tokenizer": {"patch_size": 3}},
     "tokenizer.patch_size = 3 does not divide prepare.resolution = 16"),
    ({"prepare": {"resolution": 28}, "tokenizer": {"patch_size": 8}},
     "tokenizer.patch_size = 8 does not divide prepare.resolution = 28"),
    ({"prepare": {"resolution": 4}},
     "prepare.resolution = 4 is too small for the judge"),
    ({"prepare": {"resolution": 1024}, "tokenizer": {"patch_size": 2}},
     "makes 262144 patches per image, more than 65536"),
    ({"judge": {"augment_shift": 16}},
     "judge.augment_shift = 16 must be smaller than prepare.resolution = 16"),
    ({"compute": {"num_workers": 3}},
     "judge.batch_size = 128 does not split evenly over compute.num_workers = 3"),
    ({"compute": {"num_workers": 4}, "generator": {"batch_size": 66}},
     "generator.batch_size = 66 does not split evenly over compute.num_workers = 4"),
    ({"rl": {"rewards": {}}}, "rl: rewards is empty"),
    ({"rl": {"rewards": {"judge_logprob": 0, "judge_margin": 0.0}}},
     "every weight is 0, so every rollout scores 0"),
    ({"rl": {"rewards": {"judge_logprb": 1.0}}},
     "unknown reward 'judge_logprb'; built-ins: judge_logprob, judge_prob, judge_margin, "
     "judge_density, "
     "jpeg_compressibility, jpeg_incompressibility"),
    ({"rl": {"rewards": {"my module:fn": 1.0}}}, "unknown reward 'my module:fn'"),
    ({"rl": {"classes_per_step": 1000, "group_size": 1000}},
     "classes_per_step x group_size = 1000 x 1000 = 1000000 rollouts per update"),
    ({"tokenizer": {"quantizer": "fsq", "token_dim": 8, "fsq_levels": [16] * 8}},
     "make 4294967296 codes, more than 16777216"),
    ({"tokenizer": {"quantizer": "fsq", "token_dim": 3}},
     "quantizer fsq needs token_dim == len(fsq_levels)"),
    ({"tokenizer": {"layout": "2d", "nested_dropout": True}}, "nested_dropout needs layout 1d"),
])
def test_combinations_that_cannot_work_are_refused(raw, expected):
    with pytest.raises(ConfigError) as err:
        build_params(raw, "my.yaml")
    assert str(err.value).startswith("my.yaml: ")
    assert expected in str(err.value)


@pytest.mark.parametrize("raw", [
    {"compute": {"num_workers": 4}},  # 128, 64, 64 all split over 4
    {"prepare": {"resolution": 12}},  # tokenizer patch 4; judge needs only >= 8
    {"prepare": {"resolution": 8}, "tokenizer": {"patch_size": 8}},
    {"rl": {"rewards": {"judge_logprob": 1.0, "judge_margin": -0.5, "pkg.mod:score": 0.0}}},
    {"judge": {"augment_shift": 15}},
    # 256 x 256 patches: exactly the limit
    {"prepare": {"resolution": 512}, "tokenizer": {"patch_size": 2, "layout": "2d"}},
    {"prepare": {"resolution": 1024}, "tokenizer": {"num_tokens": 65536}},
])
def test_combinations_that_work_are_accepted(raw):
    build_params(raw)


def test_shipped_params_and_presets_build_the_models():
    """What the schema accepts, the stages' model configs accept too (no later ValueError)."""
    from latentforge.models.generator import GENERATOR_SIZES, generator_config
    from latentforge.models.judge import JudgeModelConfig
    from latentforge.models.tokenizer import TOKENIZER_SIZES
    from latentforge.tasks.tokenizer import model_config

    hints = typing.get_type_hints(config.TokenizerConfig)
    assert typing.get_args(hints["size"]) == tuple(TOKENIZER_SIZES)
    assert typing.get_args(typing.get_type_hints(config.GeneratorConfig)["size"]) == tuple(
        GENERATOR_SIZES)
    for f in [REPO / "params.yaml", *sorted((REPO / "presets").glob("*.yaml"))]:
        p = load_params(f)
        JudgeModelConfig(image_size=p.prepare.resolution, channels=p.prepare.channels,
                         num_classes=10, width=p.judge.width, feature_dim=p.judge.feature_dim,
                         dropout=p.judge.dropout)
        for quantizer in ("kl", "fsq", "vq"):
            tok = dataclasses.replace(p.tokenizer, quantizer=quantizer,
                                      token_dim=len(p.tokenizer.fsq_levels))
            for size in TOKENIZER_SIZES:
                cfg = model_config(dataclasses.replace(tok, size=size), p.prepare.resolution,
                                   p.prepare.channels)
                for gsize in GENERATOR_SIZES:
                    generator_config(gsize, num_tokens=cfg.latent_tokens,
                                     token_dim=cfg.token_dim, num_classes=10)


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_schema_and_tokenizer_model_agree_on_patch_sizes(layout):
    from latentforge.models.tokenizer import tokenizer_config

    for resolution in (8, 12, 16, 28, 30):
        for patch in range(1, 10):
            raw = {"prepare": {"resolution": resolution},
                   "tokenizer": {"patch_size": patch, "layout": layout}}
            try:
                build_params(raw)
                schema_ok = True
            except ConfigError:
                schema_ok = False
            try:
                tokenizer_config("tiny", image_size=resolution, channels=1, layout=layout,
                                 patch_size=patch)
                model_ok = True
            except ValueError:
                model_ok = False
            assert schema_ok == model_ok, (resolution, patch)


# ------------------------------------------------------------------------ duplicate YAML keys


@pytest.mark.parametrize(("text", "expected"), [
    ("prepare:\n  seed: 1\njudge:\n  steps: 3\nprepare:\n  seed: 2\n",
     "duplicate key 'prepare' at line 1 and line 5"),
    ("judge:\n  steps: 3\n  lr: 0.1\n  steps: 4\n",
     "duplicate key 'judge.steps' at line 2 and line 4"),
    ("rl:\n  rewards:\n    judge_logprob: 1.0\n    judge_logprob: 2.0\n",
     "duplicate key 'rl.rewards.judge_logprob' at line 3 and line 4"),
    ("rl:\n  rewards: {judge_logprob: 1, judge_logprob: 2}\n",
     "duplicate key 'rl.rewards.judge_logprob' at line 2, columns 13 and 31"),
    ("judge:\n  steps: 0x10\n  steps: 16\n", "duplicate key 'judge.steps' at line 2 and line 3"),
    ("judge:\n  steps: 1\ngenerator:\n  steps: 2\n  steps: 2\n",
     "duplicate key 'generator.steps' at line 4 and line 5"),
])
def test_duplicate_keys_name_key_file_and_both_lines(tmp_path, text, expected):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(f)
    assert str(err.value).startswith(f"{f}: {expected}")
    assert "DVC rejects the file" in str(err.value)


def test_merge_keys_are_not_duplicates(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text("judge: &train\n  steps: 30\n  lr: 0.01\n"
                 "generator:\n  <<: *train\n  steps: 40\n")
    p = load_params(f)
    assert (p.judge.steps, p.generator.steps, p.generator.lr) == (30, 40, 0.01)


def test_duplicate_keys_in_an_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"override 'rl\.rewards=\{a: 1, a: 2\}': duplicate "
                                          r"key 'rl\.rewards\.a'"):
        load_params(None, ["rl.rewards={a: 1, a: 2}"])


# -------------------------------------------------------------------- files that are not text


@pytest.mark.parametrize(("data", "expected"), [
    ("prepare:\n  path: café\n".encode("latin-1"),
     "not UTF-8 text: byte 0xe9 at byte offset 20 (line 2)"),
    (b"prepare:\n  seed: 1\x00\n", "not UTF-8 text: NUL byte at byte offset 18 (line 2)"),
    (bytes(range(128, 256)) * 4, "not UTF-8 text: byte 0x80 at byte offset 0 (line 1)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text: NUL byte at byte offset 8"),
    ("prepare:\n  seed: 1\n".encode("utf-16"), "not UTF-8 text: NUL byte at byte offset 3"),
], ids=["latin-1", "nul", "binary", "png", "utf-16"])
def test_files_that_are_not_utf8_text_name_the_file_and_byte(tmp_path, data, expected):
    f = tmp_path / "p.yaml"
    f.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_params(f)
    assert str(err.value).startswith(f"{f}: {expected}")


def test_utf8_with_a_byte_order_mark_is_text(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_bytes("\ufeffprepare:\n  path: café\n".encode())
    assert load_params(f).prepare.path == "café"


def test_a_directory_is_not_a_params_file(tmp_path):
    with pytest.raises(ConfigError, match=f"params file {tmp_path} is a directory"):
        load_params(tmp_path)


# ------------------------------------------------------------------------ the CLI exits with 2


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("data", "expected"), [
    ("generator:\n  lr: .nan\n", "generator.lr = nan is not a finite number"),
    ("generator:\n  batch_size: 1000000\n", "generator.batch_size = 1000000 is out of range"),
    ("tokenizer:\n  patch_size: 5\n",
     "tokenizer.patch_size = 5 does not divide prepare.resolution"),
    ("rl:\n  rewards: {}\n", "rl: rewards is empty"),
    ("judge:\n  steps: 1\n  steps: 2\n", "duplicate key 'judge.steps' at line 2 and line 3"),
    ("prepare:\n  path: caf\xe9\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 at byte offset"),
    (b"\x00\x01\x02", "not UTF-8 text: NUL byte at byte offset 0"),
], ids=["nan", "too-big", "patch", "no-reward", "duplicate", "latin-1", "binary"])
@pytest.mark.parametrize("command", [["params"], ["run"], ["stage", "judge"]])
def test_cli_params_file_errors_exit_2(capsys, tmp_path, monkeypatch, data, expected, command):
    monkeypatch.chdir(tmp_path)  # no dvc.yaml: had validation passed, run would fail otherwise
    monkeypatch.delenv("DVC_STAGE", raising=False)
    f = _write(tmp_path / "bad.yaml", data)
    assert main([*command, "--params", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}: ") and expected in err


def test_cli_directory_as_params_file_exits_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    assert main(["params", "--params", "cfg"]) == 2
    assert "error: params file cfg is a directory" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "expected"), [
    ("generator.lr=nan", "generator.lr = 'nan' is not a finite number"),
    ("generator.lr=.inf", "generator.lr = inf is not a finite number"),
    ("evaluate.cfg_scale=-inf", "evaluate.cfg_scale = '-inf' is not a finite number"),
    ("rl.rewards={judge_logprob: nan}", "rl.rewards.judge_logprob = 'nan' is not a finite"),
    ("storage.connect_timeout=nan", "storage.connect_timeout = 'nan' is not a finite number"),
    ("cache.shard_size=100000000", "cache.shard_size = 100000000 is out of range"),
    ("prepare.seed=18446744073709551616", "prepare.seed = 18446744073709551616 is out of range"),
    ("tokenizer.patch_size=3", "tokenizer.patch_size = 3 does not divide prepare.resolution = 16"),
    ("compute.num_workers=3", "does not split evenly over compute.num_workers = 3"),
    ("rl.rewards={judge_logprob: 0}", "every weight is 0"),
    ("rl.rewards={a: 1, a: 2}", "duplicate key 'rl.rewards.a'"),
    ("tracking.experiment=caf\udce9", "is not UTF-8 text"),  # argv bytes that were latin-1
])
@pytest.mark.parametrize("command", [["params"], ["run"]])
def test_cli_override_errors_exit_2(capsys, tmp_path, monkeypatch, override, expected, command):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "-S", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
