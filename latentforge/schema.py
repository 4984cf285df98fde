"""params.yaml as pydantic models and JSON Schema, built from the dataclass schema.

latentforge/config.py stays the one place a parameter is declared (type, default, doc, bounds)
and the one that validates (its messages name the key path and the closest key, and exit 2).
This module derives from it what tools that speak pydantic or JSON Schema need:

- `form_model()`: every section and key, each optional (left empty = keep params.yaml's
  value), with the doc, the default and the bounds as the field's description and JSON Schema
  constraints. Prefect builds a deployment's Run form from it: a section per stage with every
  key documented, instead of a free-text list of KEY=VALUE overrides.
- `json_schema()`: the whole params.yaml as JSON Schema (`latentforge params --schema`), for
  editors that check YAML against a schema.

pydantic is imported here only; the CLI's start-up never imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from latentforge.config import Params, yaml_text

_BOUNDS = ("ge", "gt", "le", "lt")


def _bounded(tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    """`tp` with the field's numeric bounds on its numbers (list items and mapping values
    included) and nan/inf refused, as config.py checks them."""
    bounds = {k: meta[k] for k in _BOUNDS if meta.get(k) is not None}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_bounded(a, meta) for a in args)]  # noqa: UP007
    if origin is list:
        return list[_bounded(args[0], meta)]  # type: ignore[misc]
    if origin is dict:
        return dict[args[0], _bounded(args[1], meta)]  # type: ignore[misc,valid-type]
    if tp is float:
        return Annotated[float, Field(allow_inf_nan=False, **bounds)]
    if tp is int:
        return Annotated[int, Field(strict=True, **bounds)]
    return tp


def _default(f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _section_model(name: str, cls: type, *, optional: bool) -> type[BaseModel]:
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, default = _bounded(hints[f.name], f.metadata), _default(f)
        doc = f.metadata.get("doc", "")
        if optional:
            text = (f"{doc.rstrip('.')}. Default {json.dumps(default)}; empty: keep "
                    f"params.yaml's value")
            fields[f.name] = (tp | None, Field(None, title=f.name, description=text))
        else:
            fields[f.name] = (tp, Field(default, title=f.name, description=doc))
    # Titles are the params.yaml keys themselves: the form's labels are what a user writes
    # in params.yaml or after -S.
    return create_model(  # type: ignore[call-overload,no-any-return]
        f"{name.capitalize()}Params", __config__=ConfigDict(extra="forbid", title=name),
        __doc__=(cls.__doc__ or f"The {name} section.").strip().splitlines()[0], **fields)


@functools.cache
def form_model() -> type[BaseModel]:
    """Every section, every key optional: what a Run form offers to change."""
    hints = typing.get_type_hints(Params)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Params):
        model = _section_model(f.name, hints[f.name], optional=True)
        fields[f.name] = (model, Field(default_factory=model, title=f.name,
                                       description=model.__doc__))
    return create_model(  # type: ignore[call-overload,no-any-return]
        "ParamChanges", __config__=ConfigDict(extra="forbid", title="Parameter changes"),
        __doc__="params.yaml keys to change, section by section; empty keys keep their value",
        **fields)


@functools.cache
def params_model() -> type[BaseModel]:
    """The whole params.yaml with its defaults (for `json_schema`)."""
    hints = typing.get_type_hints(Params)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Params):
        model = _section_model(f.name, hints[f.name], optional=False)
        fields[f.name] = (model, Field(default_factory=model, title=f.name,
                                       description=model.__doc__))
    return create_model(  # type: ignore[call-overload,no-any-return]
        "LatentForgeParams", __config__=ConfigDict(extra="forbid", title="LatentForge params.yaml"),
        __doc__="LatentForge parameters: one section per stage plus compute, tracking, storage",
        **fields)


def json_schema() -> dict[str, Any]:
    """JSON Schema of params.yaml. Cross-field rules (a patch size that divides the resolution,
    ...) are not expressible in it; `latentforge params` checks those."""
    return params_model().model_json_schema()


def as_overrides(changes: Any) -> list[str]:
    """The form's changes as `section.key=value` overrides (what `-S` takes), in schema order;
    `changes` is the form model or its dict. Values are written as one line of YAML that
    `-S` reads back as the same value (JSON did not: its `"\\ud83d\\ude00"` escapes came back as
    two surrogates, not the emoji)."""
    if changes is None:
        return []
    data = changes.model_dump(exclude_none=True) if isinstance(changes, BaseModel) else changes
    out = []
    for section, values in data.items():
        for key, value in (values or {}).items():
            if value is not None:
                out.append(f"{section}.{key}={yaml_text(value)}")
    return out
