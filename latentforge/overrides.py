"""Checked parameter values as `dvc exp run -S` overrides that DVC stores unchanged.

`latentforge -S KEY=VALUE` reads VALUE as YAML, as params.yaml is read. `dvc exp run -S` does
not: DVC parses it with Hydra's override grammar, resolves it with OmegaConf and writes the
result into params.yaml with ruamel (`dvc.utils.hydra.apply_overrides`). Passing the user's text
on, as `run --exp` did, made the experiment run with other values than the ones checked and
logged (an audit ran 329 cases through DVC's own code): `é` typed as JSON's `"\\u00e9"` was
stored as those 6 characters, `a\\b` as `a\\\\b`, `${oc.env:HOME}` was expanded, `a,b` read as
a sweep, and a mapping such as `rl.rewards={judge_density: 1.0}` was merged into the old one
(or refused by Hydra only after the workspace lock and the MLflow run were taken).

So an experiment passes DVC only what this module renders from the checked values, whatever
the user typed (YAML after `-S`) or the Run form sent:

- strings single-quoted, with Hydra's escapes (`\\'`, backslashes before a quote or the end
  doubled) and OmegaConf's (`\\${` so nothing is interpolated); other characters, non-ASCII
  included, as they are;
- null, true/false, ints, floats by `repr` (which Hydra reads back exactly); nan and inf have
  no `-S` form and are refused;
- `???` (OmegaConf's missing value, in any quoting) and U+0085 (NEL: ruamel writes it as it
  is, and PyYAML reads it as a line break) are refused;
- lists as `[...]`; a mapping replaces the old value (`~key` then `+key={...}`; plain
  `key={...}` merges), its keys spelled with Hydra's backslash escapes;
- a key params.yaml lacks (or holds as null) is added with `+key=...` (DVC opens the file in
  struct mode, where `key=...` is refused).

`dvc_set_params_checked` then applies them with DVC's own code to a copy of params.yaml and
refuses, before any lock or run, a value DVC would store otherwise. tests/test_overrides.py
checks the rendering through DVC's `apply_overrides` over nasty values and random strings.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from latentforge.config import (
    DEFAULT_PARAMS_FILE,
    Params,
    parse_override,
    parse_params_bytes,
    read_params_bytes,
    read_params_file,
)
from latentforge.errors import ConfigError

_PARAM_KEY = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*")
# Hydra's dict keys cannot be quoted: these characters stand as they are, these behind a
# backslash (its grammar's UNQUOTED_CHAR, ID and ESC tokens), and no others exist.
_KEY_PLAIN = re.compile(r"[A-Za-z0-9_\-/+.$%*@?|]")
_KEY_ESCAPED = frozenset("\\()[]{}:=, \t")
# A key that is one number, bool or null token would come back as that, not as a string.
_KEY_NOT_TEXT = re.compile(r"[+-]?(?=[._]*[0-9])[0-9._]*(?:[eE][+-]?[0-9_]+)?|[+-]?(?:inf|nan)"
                           r"|true|false|null", re.IGNORECASE)
_MISSING = object()


def _quoted(text: str) -> str:
    """`text` as a single-quoted Hydra string that OmegaConf leaves as it is."""
    # OmegaConf resolves `${...}` in every string DVC stores: `\${` is a literal `${`, and
    # backslashes standing right before it are escapes too, so they are doubled.
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    # Hydra: `\'` is a quote; backslashes before a quote, or before the closing quote, are
    # halved when read, so they are doubled. Any other character stands for itself.
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)\Z", lambda m: m.group(1) * 2, text)  # not `$`: it matches before a \n
    return f"'{text}'"


def _dict_key(name: Any, key: str) -> str:
    """A mapping key of parameter `key` in Hydra's dict-key spelling."""
    if not isinstance(name, str) or not name or _KEY_NOT_TEXT.fullmatch(name):
        raise ConfigError(f"{key}: the key {name!r} has no `dvc exp run -S` form (Hydra would "
                          "read it as a number, bool or null)")
    out = []
    for ch in name:
        if ch in _KEY_ESCAPED:
            out.append("\\" + ch)
        elif _KEY_PLAIN.fullmatch(ch):
            out.append(ch)
        else:
            raise ConfigError(f"{key}: the key {name!r} has no `dvc exp run -S` form (Hydra's "
                              f"mapping keys cannot hold {ch!r})")
    return "".join(out)


def hydra_value(value: Any, key: str) -> str:
    """`value` in Hydra's override grammar, as DVC stores it unchanged; `key` names it in errors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r} is not a finite number: `dvc exp run -S` "
                              "cannot carry it")
        return repr(value)  # shortest text that reads back as the same float
    if isinstance(value, str):
        if value == "???":  # OmegaConf's mark of a missing value, whatever the quoting
            raise ConfigError(f"{key} = '???': `dvc exp run -S` cannot carry it (OmegaConf "
                              "reads it as a missing value)")
        if "\x85" in value:  # ruamel writes NEL as it is; YAML 1.1 (PyYAML) reads a line break
            raise ConfigError(f"{key} = {value!r}: `dvc exp run -S` cannot carry U+0085 (NEL): "
                              "params.yaml would hold a line break there")
        return _quoted(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v, f"{key}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_dict_key(k, key)}: {hydra_value(v, f'{key}.{k}')}"
                               for k, v in value.items()) + "}"
    raise ConfigError(f"{key} = {value!r}: a {type(value).__name__} has no `dvc exp run -S` form")


def overridden_values(params: Params, overrides: Iterable[str]) -> dict[str, Any]:
    """The checked value of each parameter (`section.key`) that `overrides` set, in order; an
    override inside a mapping (`rl.rewards.judge_prob=2`) yields the whole mapping."""
    data = params.to_dict()
    values: dict[str, Any] = {}
    for text in overrides:
        parts, _ = parse_override(text)
        section, name = parts[0], parts[1]
        values[f"{section}.{name}"] = data[section][name]
    return values


def dvc_set_params(values: Mapping[str, Any], base: Mapping[str, Any]) -> list[str]:
    """`dvc exp run -S` overrides that make each `section.key` of `values` exactly its value in
    a params.yaml holding `base` (as read)."""
    out = []
    for key, value in values.items():
        if not _PARAM_KEY.fullmatch(key):
            raise ConfigError(f"{key!r} is not a section.key parameter")
        section, name = key.split(".")
        old = base.get(section)
        old = old.get(name) if isinstance(old, Mapping) else None
        text = hydra_value(value, key)
        if old is None:  # struct mode: only an addition may create it (or fill a null)
            out.append(f"+{key}={text}")
        elif isinstance(old, Mapping) or isinstance(value, Mapping):
            out += [f"~{key}", f"+{key}={text}"]  # `key={...}` would merge into the old one
        else:
            out.append(f"{key}={text}")
    return out


def same_value(a: Any, b: Any) -> bool:
    """Equal with the same types throughout (1, 1.0 and True are three values here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return ({(type(k), k) for k in a} == {(type(k), k) for k in b}
                and all(same_value(a[k], b[k]) for k in a))
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def dvc_stored(set_params: list[str], params_text: bytes) -> dict[str, Any]:
    """params.yaml (`params_text`) as the stage reads it after `dvc exp run -S` applied
    `set_params`, with DVC's own code; what DVC would refuse is a ConfigError."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides

    shown = " ".join(f"-S {item}" for item in set_params)
    by_file = to_path_overrides(set_params)
    overrides = by_file.pop(DEFAULT_PARAMS_FILE, [])
    if by_file:  # `file.yaml:key=...`: not one of ours
        raise ConfigError(f"`dvc exp run {shown}` would change {', '.join(by_file)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DEFAULT_PARAMS_FILE
        path.write_bytes(params_text)
        try:
            if any(o.is_sweep_override() for o in to_hydra_overrides(overrides)):
                raise ValueError("a sweep (DVC runs those only with --queue)")
            apply_overrides(path, overrides)
        except Exception as exc:  # noqa: BLE001 - whatever stops DVC here stops the experiment
            lines = str(exc.__cause__ or exc).strip().splitlines() or [type(exc).__name__]
            raise ConfigError(f"`dvc exp run {shown}` is refused by DVC: {lines[0]}") from None
        return read_params_file(path)


def dvc_set_params_checked(params: Params, overrides: list[str],
                           params_file: str | Path = DEFAULT_PARAMS_FILE
                           ) -> tuple[dict[str, Any], list[str]]:
    """For an experiment on `params_file` with `overrides` (checked: `params`): the checked
    value of each parameter they change (`section.key` -> value) and the `dvc exp run -S`
    overrides that store exactly those; a ConfigError where DVC would store another value."""
    text = read_params_bytes(params_file) if Path(params_file).exists() else b""
    base = parse_params_bytes(text, params_file) if text else {}
    values = overridden_values(params, overrides)
    set_params = dvc_set_params(values, base)
    stored = dvc_stored(set_params, text)
    for key, value in values.items():
        section, name = key.split(".")
        got = stored.get(section)
        got = got.get(name, _MISSING) if isinstance(got, dict) else _MISSING
        if not same_value(got, value):
            shown = "nothing" if got is _MISSING else repr(got)
            raise ConfigError(f"{key}: `dvc exp run -S` would store {shown}, not the checked "
                              f"{value!r}")
    return values, set_params
