"""Where a registered model came from: the tags that record it, and `latentforge lineage`.

Every stage input is found in MLflow by its digest, never by a workspace path (the folder
holds other content after the next run): a model input is the registered version whose
`latentforge.weights_sha256` tag equals the digest, a data input (prepared images, latent
cache, post-trained decoder) the newest finished run that tagged
`latentforge.output.<name>.sha256` with it. Runs
with identical outputs are interchangeable here (same bytes), so "newest" is a safe choice.

Tags, on the consuming run and copied onto every model version it registers:

    latentforge.upstream.<input>        registered version of a model input, e.g.
                                        latentforge.upstream.tokenizer = latentforge-tokenizer/3
    latentforge.upstream.<input>_run    run that produced the input (models and data alike)
    latentforge.output.<name>.sha256    on a run: the digest of what it produced (data outputs)
    latentforge.output.<name>.uri       on a run: the logged artifact naming that content

Version tags also carry `latentforge.stage`, `latentforge.prepared_sha256` (the data digest),
the input digests the stage recorded, and the version has a one-paragraph description.
Following `latentforge.upstream.*` from any version reaches the prepare run, whose params
name the source. The RL generator is its own registered model (not a tagged version of the
base generator's), so `latest` and version numbers mean one kind of model each.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentforge import paths, tracking
from latentforge.errors import LatentForgeError

UPSTREAM = f"{tracking.TAG_PREFIX}upstream."
RUN_SUFFIX = "_run"
WEIGHTS_TAG = f"{tracking.TAG_PREFIX}weights_sha256"
STAGE_TAG = f"{tracking.TAG_PREFIX}stage"


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model one stage adds a version to on every run."""

    name: str
    description: str


# Keyed by the stage output's name (what later stages call the input, StageResult.digests).
REGISTERED_MODELS: dict[str, RegisteredModel] = {
    "judge": RegisteredModel(
        "latentforge-judge", "Judge classifiers from the judge stage: their features give the "
        "tokenizer's rFD-judge, their log-probabilities the RL reward (generated samples are "
        "graded by latentforge-evaluator). Input: uint8 images (N, H, W, C); output: class log-probabilities."),
    "evaluator": RegisteredModel(
        "latentforge-evaluator", "Evaluator classifiers from the judge stage (another seed and "
        "width than the judge, same data): they grade generated samples (gFD, accuracy, "
        "precision/recall, IS, diversity) and never give a reward. Input: uint8 images "
        "(N, H, W, C); output: class log-probabilities."),
    "tokenizer": RegisteredModel(
        "latentforge-tokenizer", "Image tokenizers from the tokenizer stage (1D TiTok-style or "
        "2D). Input: uint8 images (N, H, W, C); output: their reconstructions."),
    "generator": RegisteredModel(
        "latentforge-generator", "Base class-conditional generators (flow matching, MaskGIT "
        "or autoregressive) from the generator stage, logged with the tokenizer they decode with. Input: int64 class "
        "labels (N,); output: uint8 images. RL fine-tunes are in latentforge-generator-rl."),
    "rl": RegisteredModel(
        "latentforge-generator-rl", "Generators fine-tuned with Flow-GRPO (or GRPO over "
        "tokens) by the rl stage, "
        "each from a version of latentforge-generator (tag latentforge.upstream.generator). "
        "Input: int64 class labels (N,); output: uint8 images."),
}

# Outputs of stages that register no model: found by the run's latentforge.output tag.
PRODUCED_BY = {"prepared": "prepare", "cache": "cache", "decoder": "posttrain"}

WHAT = {
    "judge": "A small CNN classifier of the prepared images, the pipeline's judge (the RL "
             "reward).",
    "evaluator": "A small CNN classifier of the prepared images (width {width}, seed {seed}), "
                 "the pipeline's evaluator: it grades generated samples, never rewards them.",
    "tokenizer": "An image tokenizer ({layout} layout, {quantizer} quantizer) that encodes "
                 "images to latent tokens and decodes them back.",
    "generator": "A class-conditional generator (flow matching on the tokenizer's latents, or "
                 "MaskGIT / autoregressive over its codes; the base model, before RL).",
    "rl": "The base generator fine-tuned with Flow-GRPO (GRPO over tokens for MaskGIT and "
          "autoregressive generators) on the reward `{reward}`.",
}


@dataclass(frozen=True)
class Producer:
    """The run (and registered version, for a model) that produced an input of this run."""

    name: str  # the input's name: prepared, judge, tokenizer, cache, generator, rl
    run_id: str
    uri: str  # content, not a folder: models:/NAME/VERSION or runs:/ID/manifest.json
    version: str | None = None  # NAME/VERSION of a registered model

    def tags(self) -> dict[str, str]:
        tags = {f"{UPSTREAM}{self.name}{RUN_SUFFIX}": self.run_id}
        if self.version:
            tags[f"{UPSTREAM}{self.name}"] = self.version
        return tags


def output_tags(name: str, digest: str, uri: str) -> dict[str, str]:
    prefix = f"{tracking.TAG_PREFIX}output.{name}"
    return {f"{prefix}.sha256": digest, f"{prefix}.uri": uri}


def find_producer(client: Any, experiment_id: str, name: str, digest: str) -> Producer | None:
    """The first registered version or finished run whose output `name` has `digest`, of a
    run that still exists. The first: the same bytes made again (a DVC experiment's copy
    retrains what git's commit lacks and registers it anew) must not move a workspace
    model's lineage into that experiment, whose runs may be deleted with it."""
    if not re.fullmatch(r"[0-9a-f]{16,128}", digest):  # goes into a filter string
        return None
    if name in REGISTERED_MODELS:
        model = REGISTERED_MODELS[name].name
        versions = client.search_model_versions(
            f"name = '{model}' and tags.`{WEIGHTS_TAG}` = '{digest}'")
        for v in sorted(versions, key=lambda v: int(v.version)):
            if _run_exists(client, v.run_id):
                return Producer(name, v.run_id, f"models:/{v.name}/{v.version}",
                                f"{v.name}/{v.version}")
        return None
    if name in PRODUCED_BY:
        tag = f"{tracking.TAG_PREFIX}output.{name}"
        runs = client.search_runs(  # active runs only: a deleted one is not offered
            [experiment_id], f"tags.`{tag}.sha256` = '{digest}' and "
            f"tags.`{STAGE_TAG}` = '{PRODUCED_BY[name]}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"], max_results=1)
        if not runs:
            return None
        run = runs[0]
        return Producer(name, run.info.run_id,
                        run.data.tags.get(f"{tag}.uri", f"runs:/{run.info.run_id}"))
    return None


def _run_exists(client: Any, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        return bool(client.get_run(run_id).info.lifecycle_stage == "active")
    except MlflowException:  # purged (`mlflow gc`)
        return False


class _Blanks(dict):
    """Tags for str.format_map: a tag the stage did not set reads "?"."""

    def __missing__(self, key: str) -> str:
        return "?"


# MLflow 3.17's UI opens a page in its GenAI view unless the link asks for this one.
UI_VIEW = "?workflowType=machine_learning"


def _run_link(run_id: str, experiment_id: str | None) -> str:
    """A run as a Markdown link the MLflow UI follows. The run's own page, not the short
    `#/runs/ID` route: that one redirects and drops the view."""
    page = f"experiments/{experiment_id}/runs/{run_id}" if experiment_id else f"runs/{run_id}"
    return f"[{run_id}](#/{page}{UI_VIEW})"


def _version_link(version: str) -> str:
    """NAME/VERSION as a Markdown link to the registered version's page in the MLflow UI."""
    name, _, number = version.partition("/")
    return f"[{version}](#/models/{name}/versions/{number}{UI_VIEW})"


def describe_version(stage: str, tags: Mapping[str, str], upstream: Mapping[str, Producer],
                     run_id: str | None, experiment_id: str | None = None) -> str:
    """The model version's one-paragraph description: what it is, on what, from what. Runs and
    upstream versions are Markdown links: the MLflow UI renders the description, so the chain
    back to the data is a series of clicks there."""
    role = tags.get("role", stage)  # the judge stage makes two models: judge and evaluator
    what = WHAT.get(role, f"A model from the {stage} stage.").format_map(_Blanks(tags))
    made = (f" Trained by the {stage} stage in run "
            f"{_run_link(run_id, experiment_id) if run_id else '?'}")
    if data := tags.get("prepared_sha256"):
        made += f" on prepared data sha256 {data[:12]}"
        if "prepared" in upstream:
            made += f" (prepare run {_run_link(upstream['prepared'].run_id, experiment_id)})"
    made += "."
    others = [f"{p.name} {_version_link(p.version)}" if p.version
              else f"{p.name} from run {_run_link(p.run_id, experiment_id)}"
              for p in upstream.values() if p.name != "prepared"]
    if others:
        made += f" Upstream: {', '.join(others)}."
    weights = tags.get("weights_sha256")
    return what + made + (f" Weights sha256 {weights[:12]}." if weights else "")


# ------------------------------------------------------------------------------ the command


@dataclass
class Hop:
    """One step of the chain: a registered version (with its run) or a run alone."""

    name: str  # input name that led here (the model's own stage for the first hop)
    run_id: str
    stage: str
    params_digest: str
    digest: str  # weights sha256 for a model, output sha256 for data
    version: str | None = None
    upstream: list[Hop | str] = field(default_factory=list)  # str: why an input is missing
    seen: bool = False  # printed earlier in the chain
    run: Any = None


def params_digest(run: Any, stage: str) -> str:
    """sha256 of the params the stage reads, as the run logged them: its own section and the
    other keys DVC records for it (rl's generator.sample_steps, compute.precision, ...)."""
    spec = paths.STAGES.get(stage)
    wanted = spec.params if spec else (stage,)
    own = sorted((k, v) for k, v in run.data.params.items()
                 if any(k == w or k.startswith(f"{w}.") for w in wanted))
    return hashlib.sha256("\n".join(f"{k}={v}" for k, v in own).encode()).hexdigest()


# Nearest stage first, so that the first branch printed is the chain back to the data.
ORDER = ("rl", "generator", "decoder", "cache", "tokenizer", "judge", "evaluator", "prepared")


def _references(tags: Mapping[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """input name -> (registered NAME/VERSION or None, run id or None), from upstream tags."""
    refs: dict[str, tuple[str | None, str | None]] = {}
    for key, value in tags.items():
        if not key.startswith(UPSTREAM):
            continue
        name = key.removeprefix(UPSTREAM)
        if name.endswith(RUN_SUFFIX):
            name = name.removesuffix(RUN_SUFFIX)
            refs[name] = (refs.get(name, (None, None))[0], value)
        else:
            refs[name] = (value, refs.get(name, (None, None))[1])
    return dict(sorted(refs.items(), key=lambda kv: (
        ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER), kv[0])))


class _Walker:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.visited: dict[str, Hop] = {}

    def version_hop(self, name: str, mv: Any) -> Hop:
        key = f"{mv.name}/{mv.version}"
        if key in self.visited:
            return _seen(self.visited[key], name)
        run = self.client.get_run(mv.run_id)
        stage = mv.tags.get(STAGE_TAG) or run.data.tags.get(STAGE_TAG, "?")
        hop = Hop(name, mv.run_id, stage, params_digest(run, stage),
                  mv.tags.get(WEIGHTS_TAG, "?"), version=key, run=run)
        self.visited[key] = hop
        hop.upstream = self.follow(mv.tags)
        return hop

    def run_hop(self, name: str, run_id: str) -> Hop:
        if run_id in self.visited:
            return _seen(self.visited[run_id], name)
        run = self.client.get_run(run_id)
        stage = run.data.tags.get(STAGE_TAG, "?")
        hop = Hop(name, run_id, stage, params_digest(run, stage),
                  run.data.tags.get(f"{tracking.TAG_PREFIX}output.{name}.sha256", "?"), run=run)
        self.visited[run_id] = hop
        hop.upstream = self.follow(run.data.tags)
        return hop

    def follow(self, tags: Mapping[str, str]) -> list[Hop | str]:
        from mlflow.exceptions import MlflowException

        hops: list[Hop | str] = []
        for name, (version, run_id) in _references(tags).items():
            try:
                if version:
                    model, number = version.rsplit("/", 1)
                    hops.append(self.version_hop(name, self.client.get_model_version(model,
                                                                                    number)))
                elif run_id:
                    hops.append(self.run_hop(name, run_id))
            except MlflowException:
                hops.append(f"{name}: {version or 'run ' + str(run_id)} is no longer in the "
                            "store (deleted?)")
        return hops


def _seen(hop: Hop, name: str) -> Hop:
    return Hop(name, hop.run_id, hop.stage, hop.params_digest, hop.digest, hop.version,
               seen=True)


def _describe(hop: Hop) -> str:
    kind = "weights" if hop.version else "sha256"
    return f"{hop.name}: " + "  ".join([*([hop.version] if hop.version else []),
                                        f"stage {hop.stage}", f"run {hop.run_id}",
                                        f"params {hop.params_digest[:12]}",
                                        f"{kind} {hop.digest[:12]}"])


def _lines(hop: Hop, depth: int = 0) -> list[str]:
    indent = "  " * (depth + 1)
    lines = ["  " * depth + _describe(hop)]
    for up in hop.upstream:
        if isinstance(up, str):
            lines.append(indent + up)
        elif not up.seen:
            lines += _lines(up, depth + 1)
    again = [up.name for up in hop.upstream if isinstance(up, Hop) and up.seen]
    if again:
        lines.append(f"{indent}also {', '.join(again)} (shown above)")
    if not hop.upstream and hop.stage != "prepare":
        lines.append(f"{indent}(no upstream tags: logged before LatentForge recorded lineage)")
    return lines


def _prepare_hops(hop: Hop) -> list[Hop]:
    found = [hop] if hop.stage == "prepare" and not hop.seen else []
    for up in hop.upstream:
        if isinstance(up, Hop):
            found += _prepare_hops(up)
    return found


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS -> (name, version,
    alias); anything else raises LatentForgeError."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+|latest)|@([\w-]+))", uri)
    if not match:
        raise LatentForgeError(f"lineage needs a registered model version, models:/NAME/VERSION "
                               f"or models:/NAME@ALIAS (e.g. models:/"
                               f"{REGISTERED_MODELS['rl'].name}/1), got {uri!r}")
    return match.group(1), match.group(2), match.group(3)


def _model_version(client: Any, uri: str, store: str) -> Any:
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if versions:
                return max(versions, key=lambda v: int(v.version))
        else:
            return client.get_model_version(name, version)
    except MlflowException:
        pass
    raise LatentForgeError(f"{uri}: no such registered model version in {store}"
                           + registered_models_note(client))


def registered_models_note(client: Any = None) -> str:
    """"; registered models: a, b" from the project's store (or `client`'s)."""
    from mlflow import MlflowClient

    client = client or MlflowClient(tracking_uri=tracking.tracking_uri(),
                                    registry_uri=tracking.tracking_uri())
    known = sorted(m.name for m in client.search_registered_models())
    return f"; registered models: {', '.join(known) or 'none'}"


def existing_store(root: str | Path = ".") -> str:
    """The project's tracking URI; LatentForgeError where it names a SQLite file that does not
    exist (MLflow would create an empty store there and then report every model unknown)."""
    uri = tracking.tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise LatentForgeError(f"no MLflow store at {uri.removeprefix('sqlite:///')}: run the "
                               f"pipeline first (here: the project root), or set "
                               f"MLFLOW_TRACKING_URI")
    return uri


def cmd_lineage(model_uri: str, root: str | Path = ".") -> str:
    """The chain from a registered model version back to the prepared data and its source,
    as text to print; LatentForgeError (one line) for a bad or unknown URI."""
    from mlflow import MlflowClient

    parse_model_uri(model_uri)  # a bad URI fails before any store is opened
    uri = existing_store(root)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = _model_version(client, model_uri, uri)
    walker = _Walker(client)
    # Named by its role: the judge stage registers the judge and the evaluator.
    top = walker.version_hop(mv.tags.get(f"{tracking.TAG_PREFIX}role")
                             or mv.tags.get(STAGE_TAG, "model"), mv)
    lines = [f"{model_uri} comes from (each hop: input, registered version, stage, MLflow run, "
             f"sha256 of the stage's params and of the content, 12 digits):", *_lines(top)]
    data = _prepare_hops(top)
    if not data:
        lines.append("data: not reached (a hop lacks lineage tags)")
    for hop in data:
        params = hop.run.data.params
        source = params.get("prepare.source", "?")
        where = ("" if source in ("digits", "shapes")  # embedded: prepare.path is ignored
                 else f", path {params.get('prepare.path', '?')}")
        fingerprint = hop.run.data.tags.get(f"{tracking.TAG_PREFIX}input.source.sha256")
        lines.append(f"data: prepared sha256 {hop.digest} from prepare run {hop.run_id}")
        lines.append(f"source: {source}{where}"
                     + (f" (source fingerprint {fingerprint[:12]})" if fingerprint else ""))
    if len({h.digest for h in data}) > 1:
        lines.append("warning: the chain reaches more than one prepared data set")
    return "\n".join(lines)
