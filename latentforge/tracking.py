"""Experiment tracking behind one small interface.

`Tracker` is the null implementation (tests, non-zero Ray ranks, `tracking.enabled: false`);
`MLflowTracker` has the same methods and talks to MLflow. Stages receive a tracker and never
import mlflow themselves. Only the driver process ever holds an `MLflowTracker`.

Default store: an SQLite file in the project (`mlflow.db`), artifacts in `mlartifacts/`,
both overridable (MLFLOW_TRACKING_URI; `tracking.artifact_location`).

Lineage: `log_input` finds the run or registered version that produced each input (by its
digest) and tags it; `log_output` marks what a run produced; `log_model` copies those tags
onto the registered version. The tag scheme is in `latentforge.lineage`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentforge import procs
from latentforge.errors import LatentForgeError

if TYPE_CHECKING:
    from latentforge.config import TrackingConfig

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "LATENTFORGE_PARENT_RUN_ID"
# MLflow's experiment kind: "custom_model_development" is its "Machine learning" kind (runs,
# models), "genai_development" the GenAI one (traces). See _experiment_id.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
FLOW_RUN_ENV = "LATENTFORGE_FLOW_RUN_ID"
TAG_PREFIX = "latentforge."
MLFLOW_DIGEST_LEN = 36
# MLflow's REST client retries 7 times with exponential back-off (~4 min for a server that is
# down) and waits 120 s per request (a server that never answers: ~15 min). That rides out a
# server restart in a long training, so it stays; a run asks once, quickly, before it starts.
PROBE_TIMEOUT_S = 10.0


def served(uri: str) -> bool:
    """Whether `uri` is an MLflow tracking server (not a local store)."""
    return uri.startswith(("http://", "https://"))


def check_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A tracking server that does not answer within `timeout` is one LatentForgeError line
    before a run starts (probe.unanswered says what counts as an answer)."""
    from latentforge.probe import shown_url, unanswered

    if not served(uri):
        return
    reason = unanswered(uri, timeout)
    if reason is not None:
        raise LatentForgeError(f"MLflow tracking server {shown_url(uri)} (MLFLOW_TRACKING_URI) "
                               f"does not answer: {reason}; start it or fix MLFLOW_TRACKING_URI "
                               "(or run without tracking: -S tracking.enabled=false)")


class Tracker:
    """Does nothing; the interface every tracker has."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_input(self, name: str, source: str, digest: str, context: str,
                  profile: Mapping[str, Any] | None = None) -> None:
        """Record that this run read `name` (found by `digest`: see latentforge.lineage)."""

    def log_output(self, name: str, manifest: str | os.PathLike[str], digest: str,
                   profile: Mapping[str, Any] | None = None) -> None:
        """Record that this run produced the data folder `name` with `digest`; `manifest` is
        the file in it that lists its content by sha256 (logged, and named as the content)."""

    def log_model(self, name: str, model_dir: str | os.PathLike[str], registered_name: str,
                  tags: Mapping[str, str] | None = None,
                  artifacts: Mapping[str, str | os.PathLike[str]] | None = None) -> str | None:
        """Log a saved model folder (safetensors + JSON) as an MLflow model and register it.

        `artifacts`: further folders the model needs to predict, by name (a generator's
        tokenizer), so that the registered model works outside the project folder.
        """
        return None


def tracking_uri(root: str | os.PathLike[str] = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def use_tracking_uri(root: str | os.PathLike[str] = ".") -> None:
    """Point the MLflow client at the project's store. mlflow.set_tracking_uri also exports
    MLFLOW_TRACKING_URI to child processes; undo that so a later subprocess in another project
    (a `dvc repro` there) does not log into this project's store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(root))
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def git_sha(root: str | os.PathLike[str] = ".") -> str:
    """HEAD's sha (with '-dirty' when tracked files changed), or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


class MLflowTracker(Tracker):
    """Logs to the active MLflow run `run_id`."""

    def __init__(self, run_id: str, experiment_id: str | None = None,
                 root: str | os.PathLike[str] = ".") -> None:
        import mlflow

        from latentforge.lineage import Producer

        # log_model's live "Downloading artifacts" bars become a dozen lines per model in the
        # DVC/Prefect logs; a user who wants them sets the variable to true.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self._mlflow = mlflow
        self.run_id = run_id
        self._experiment_id = experiment_id or mlflow.get_run(run_id).info.experiment_id
        self._root = Path(root).resolve()
        self._upstream: dict[str, Producer] = {}  # input name -> the run/version that made it

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._mlflow.log_params(_flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @contextlib.contextmanager
    def _artifact_errors(self) -> Iterator[None]:
        """An S3 artifact store's failure (an endpoint that does not answer, no credentials) as
        one line naming it and the AWS settings looked at, as LatentForge's own S3 calls say."""
        from latentforge import storage

        with storage.storage_errors(self._mlflow.get_artifact_uri()):
            yield

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        with self._artifact_errors():
            if Path(path).is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._artifact_errors():
            self._mlflow.log_text(text, artifact_file)

    def log_input(self, name: str, source: str, digest: str, context: str,
                  profile: Mapping[str, Any] | None = None) -> None:
        """The dataset points at content: the registered version or the producing run's
        manifest when MLflow knows who made `digest`, else `source` (with its DVC-tracked path
        in the profile); the producer is tagged on the run and on the models it registers."""
        from latentforge import lineage

        producer = lineage.find_producer(self._mlflow.MlflowClient(), self._experiment_id,
                                         name, digest)
        if producer is not None:
            self._upstream[name] = producer
            self.set_tags(producer.tags())
        elif name in lineage.REGISTERED_MODELS or name in lineage.PRODUCED_BY:
            log.warning("MLflow has no run that produced %s %s (was it run with tracking off, "
                        "or into another store?): lineage stops at this input", name, digest[:12])
        self._log_dataset(name, producer.uri if producer else str(source), digest, context,
                          {**self._dvc_path(source), **(profile or {})})

    def log_output(self, name: str, manifest: str | os.PathLike[str], digest: str,
                   profile: Mapping[str, Any] | None = None) -> None:
        from latentforge import lineage

        manifest = Path(manifest)
        self.log_artifact(manifest)
        uri = f"runs:/{self.run_id}/{manifest.name}"
        self.set_tags(lineage.output_tags(name, digest, uri))
        # MLflow has no dataset outputs: the output joins the run's datasets, context "output".
        self._log_dataset(name, uri, digest, "output",
                          {**self._dvc_path(manifest.parent), **(profile or {})})

    def _dvc_path(self, source: str | os.PathLike[str]) -> dict[str, str]:
        """{"dvc_path": path relative to the project} for a local path in a DVC project."""
        if "://" in str(source) or not (self._root / "dvc.yaml").exists():
            return {}
        path = (self._root / source).resolve()
        if not (path.exists() and path.is_relative_to(self._root)):  # "sklearn:digits", ...
            return {}
        return {"dvc_path": path.relative_to(self._root).as_posix()}

    def _log_dataset(self, name: str, source: str, digest: str, context: str,
                     profile: Mapping[str, Any]) -> None:
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import (
            get_registered_sources,
            resolve_dataset_source,
        )
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.exceptions import MlflowException

        if source.startswith(("runs:/", "models:/")):
            resolved = _mlflow_uri_source()(source)
        else:
            # MLflow registers two same-named local-file source classes, so every local path
            # "can be interpreted in multiple ways" and warns; one class per name keeps it
            # quiet. (Registered sources are classes; MLflow's hints say instances.)
            candidates = list({getattr(c, "__name__", repr(c)): c
                               for c in get_registered_sources()}.values())
            try:
                resolved = resolve_dataset_source(source, candidate_sources=candidates)
            except MlflowException:  # e.g. "sklearn:digits": a source that is code, not a path
                resolved = CodeDatasetSource({"uri": source})
        full = {"sha256": digest, **profile}

        # MLflow caps a dataset digest at 36 characters: the digest is the sha256's first 36
        # hex digits; the full sha256 is in the dataset profile and in a run tag.
        class DigestDataset(MetaDataset):
            @property
            def profile(self) -> dict[str, Any]:
                return full

            def to_dict(self) -> dict[str, str]:
                return {**super().to_dict(), "profile": json.dumps(full)}

        dataset = DigestDataset(source=resolved, name=name, digest=digest[:MLFLOW_DIGEST_LEN])
        self._mlflow.log_input(dataset, context=context)
        self._mlflow.set_tag(f"{TAG_PREFIX}input.{name}.sha256", digest)

    def log_model(self, name: str, model_dir: str | os.PathLike[str], registered_name: str,
                  tags: Mapping[str, str] | None = None,
                  artifacts: Mapping[str, str | os.PathLike[str]] | None = None) -> str | None:
        import mlflow.pyfunc

        from latentforge import lineage, mlflow_model

        # "Models from code": MLflow stores the module's source, not a pickle, and loading the
        # model reads only safetensors and JSON.
        folders = {"model_dir": str(model_dir), **{k: str(v) for k, v in (artifacts or {}).items()}}
        # The same tags on the logged model and on the registered version: the stage's digests
        # and, from log_input, the upstream versions and runs (latentforge.lineage).
        model_tags = {f"{TAG_PREFIX}{k}": str(v) for k, v in (tags or {}).items()}
        for producer in self._upstream.values():
            model_tags.update(producer.tags())
        with warnings.catch_warnings():
            # The signature documents the tensors; an input example would make MLflow load and
            # run every model once more at logging time, which is all this warning asks for.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=name, python_model=mlflow_model.__file__, artifacts=folders,
                signature=mlflow_model.signature(name, folders),
                pip_requirements=[f"latentforge=={_version()}"], tags=model_tags)
        # Registered here rather than through log_model so that the version gets the tags (with
        # registered_model_name MLflow puts them on the logged model only).
        version = mlflow.register_model(info.model_uri, registered_name, tags=model_tags)
        client = self._mlflow.MlflowClient()
        client.update_model_version(registered_name, version.version, description=(
            lineage.describe_version((tags or {}).get("stage", name), tags or {},
                                     self._upstream, self.run_id, self._experiment_id)))
        known = {m.name: m for m in lineage.REGISTERED_MODELS.values()}
        if registered_name in known and not client.get_registered_model(registered_name).description:
            client.update_registered_model(registered_name, known[registered_name].description)
        self.set_tags({f"{TAG_PREFIX}model.{name}": info.model_uri,
                       f"{TAG_PREFIX}registered.{name}": f"{registered_name}/{version.version}"})
        return info.model_uri


@functools.cache
def _mlflow_uri_source() -> type:
    """A dataset source for runs:/ and models:/ URIs, which MLflow's resolvers do not take."""
    from mlflow.data.dataset_source import DatasetSource

    class MLflowArtifactSource(DatasetSource):
        def __init__(self, uri: str) -> None:
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "mlflow_artifact"

        def load(self, dst_path: str | None = None) -> str:
            """Download the artifact (a manifest, a model folder); its local path."""
            import mlflow.artifacts

            return mlflow.artifacts.download_artifacts(artifact_uri=self.uri, dst_path=dst_path)

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith(("runs:/", "models:/"))

        @classmethod
        def _resolve(cls, raw_source: Any) -> MLflowArtifactSource:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> MLflowArtifactSource:
            return cls(source_dict["uri"])

    return MLflowArtifactSource


def _version() -> str:
    from latentforge import __version__

    return __version__


def _experiment_id(cfg: TrackingConfig, root: Path) -> str:
    import mlflow

    # The kind tells MLflow this is model training, not a GenAI app: without it MLflow 3 shows
    # traces and "Agent versions". An existing experiment without one gets it; a kind someone
    # chose in the UI stays.
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":
        from latentforge.errors import ConfigError

        raise ConfigError(f"tracking.experiment {cfg.experiment!r} (id {exp.experiment_id}) was "
                          f"deleted in MLflow: restore it (`mlflow experiments restore "
                          f"--experiment-id {exp.experiment_id}`), purge it to reuse the name "
                          f"(`mlflow gc`), or choose another tracking.experiment")
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG,
                                                     EXPERIMENT_KIND)
        wanted = (cfg.artifact_location or "").rstrip("/")
        if wanted and wanted != (exp.artifact_location or "").rstrip("/"):
            # MLflow fixes the location when the experiment is made: the setting was ignored
            # in silence (a typo in it could not be corrected either).
            log.warning("tracking.artifact_location = %r is not where MLflow experiment %r "
                        "keeps its artifacts (%s): MLflow fixes an experiment's artifact "
                        "location when it is made, so they go there; set tracking.experiment "
                        "to a new name to use %r", cfg.artifact_location, cfg.experiment,
                        exp.artifact_location, cfg.artifact_location)
        return exp.experiment_id
    # Against a tracking server the server decides (its --artifacts-destination, e.g. S3);
    # a local file:// location would put a team's artifacts on this machine's disk.
    uri = tracking_uri(root)
    remote = served(uri) or uri.startswith("databricks")
    location = cfg.artifact_location or (None if remote else local_artifact_root(uri, root))
    return mlflow.create_experiment(cfg.experiment, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def local_artifact_root(uri: str, root: Path) -> str:
    """`mlartifacts` beside a SQLite store (a store shared by projects keeps their artifacts
    with it, not in whichever project made the experiment first), else in the project."""
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if database.is_absolute():
            return (database.parent / "mlartifacts").resolve().as_uri()
    return (root / "mlartifacts").resolve().as_uri()


class TrackingStoreError(LatentForgeError):
    """The MLflow store cannot be opened or written: damaged, locked, of an older schema."""


def describe_store_error(exc: BaseException, uri: str) -> str | None:
    """One line for an error of the MLflow store (MLflow's or SQLAlchemy's), naming the store
    and what to do; None for any other error. The store is never moved or changed here: it
    holds every run and the model registry."""
    module = type(exc).__module__
    if not module.startswith(("mlflow", "sqlalchemy")):
        return None
    text = str(getattr(exc, "message", None) or exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    low = text.lower()
    if low.startswith("api request to") and ("failed with exception" in low
                                              or "failed with error code" in low):
        unreachable = any(s in low for s in ("newconnectionerror", "connecttimeout",
                                             "readtimeout", "connection refused",
                                             "connection aborted", "name or service"))
        what = "the server did not answer" if unreachable else "the server answered with errors"
        hint = ("start it or fix MLFLOW_TRACKING_URI" if unreachable else
                "see the tracking server's log")
        first = first.split(" failed with ")[0] + f" failed ({what})"
    elif "database is locked" in low:
        hint = "another process holds it; run again once it is done"
    elif "out-of-date database schema" in low or "mlflow db upgrade" in low:
        hint = f"upgrade it with `mlflow db upgrade {uri}` (back it up first)"
    elif "not a database" in low or "malformed" in low or "corrupt" in low:
        hint = ("it is damaged: move it aside (keep it: it holds the runs and the model "
                "registry) and a new one is made, or point MLFLOW_TRACKING_URI elsewhere")
    elif "maintenance mode" in low and "filesystem" in low:  # a folder store (./mlruns)
        first = ("MLflow 3 opens a folder store (file:// or a bare path, such as ./mlruns) only "
                 "with MLFLOW_ALLOW_FILE_STORE=true")
        hint = ("use a database store, e.g. MLFLOW_TRACKING_URI=sqlite:///mlflow.db "
                "(`mlflow migrate-filestore` moves the folder's runs there)")
    elif module.startswith("sqlalchemy") or "sqlite" in low:
        hint = "fix it or point MLFLOW_TRACKING_URI elsewhere"
    else:
        return None  # another MLflow error (a missing model, a bad URI): not the store's
    return (f"MLflow store {uri}: {first[:300]}; {hint} (or run without tracking: "
            "-S tracking.enabled=false)")


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Errors opening the MLflow store as one TrackingStoreError line (`describe_store_error`);
    the traceback goes to the debug log."""
    try:
        yield
    except Exception as exc:
        line = describe_store_error(exc, uri)
        if line is None:
            raise
        log.debug("the MLflow store %s failed", uri, exc_info=True)
        raise TrackingStoreError(line) from None


@contextlib.contextmanager
def start_run(cfg: TrackingConfig, run_name: str, tags: Mapping[str, str],
              parent_run_id: str | None = None, root: str | os.PathLike[str] = ".") -> Iterator[Tracker]:
    """Open an MLflow run (nested under `parent_run_id` if given); yields a Tracker.

    The run ends KILLED on Ctrl-C/SIGTERM, FAILED when the body raises. With `cfg.enabled` false, yields a null Tracker.
    """
    if not cfg.enabled:
        yield Tracker()
        return
    import mlflow

    root = Path(root)
    use_tracking_uri(root)
    all_tags = {"mlflow.source.git.commit": git_sha(root), f"{TAG_PREFIX}git_sha": git_sha(root),
                **tags}
    if os.environ.get(procs.INVOCATION_ENV):
        all_tags[procs.INVOCATION_TAG] = os.environ[procs.INVOCATION_ENV]
    with store_errors(tracking_uri(root)):
        experiment_id = _experiment_id(cfg, root)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                               parent_run_id=parent_run_id, tags=all_tags)
    try:
        yield MLflowTracker(run.info.run_id, experiment_id, root)
    except BaseException as exc:
        if procs.is_interrupt(exc):  # Ctrl-C or SIGTERM (inside a flow: Prefect's signal)
            with procs.interrupts_deferred():
                mlflow.end_run("KILLED")
        else:
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def find_stage_run(stage: str, parent_run_id: str | None, cfg: TrackingConfig,
                   root: str | os.PathLike[str] = ".") -> Any:
    """The newest run of `stage` (under `parent_run_id` when given), or None."""
    import mlflow

    use_tracking_uri(root)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    query = f"tags.`{TAG_PREFIX}stage` = '{stage}'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = mlflow.search_runs([exp.experiment_id], filter_string=query, max_results=1,
                              order_by=["attributes.start_time DESC"], output_format="list")
    return runs[0] if runs else None
