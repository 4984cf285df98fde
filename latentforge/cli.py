"""`latentforge` command line. Imports stay light here: torch, ray, mlflow and prefect are
imported only inside the commands that need them, so `--help` and `params` are instant."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from latentforge import procs
from latentforge.errors import ConfigError, LatentForgeError
from latentforge.malloc import tune_malloc

log = logging.getLogger("latentforge")

# `latentforge sample`'s bounds, as params.yaml's (config.MAX_SAMPLE_STEPS, MAX_PER_CLASS; a
# test keeps them equal) without importing the config module for --help.
MAX_SAMPLE_STEPS = 10_000
MAX_SAMPLES = 100_000


def _bounded(kind: type, low: float, high: float | None = None, what: str = "") -> Any:
    """An argparse type: a number of `kind` in [low, high] (finite), else argparse's own
    one-line error (exit 2) naming the option, the value and the range."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                             f", got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if value < low or (high is not None and value > high):
            show = str if kind is int else "{:g}".format
            bound = f"{show(low)}..{show(high)}" if high is not None else f">= {show(low)}"
            raise argparse.ArgumentTypeError(f"expected {what or 'a value'} {bound}, got {text}")
        return value
    return parse


PORT = _bounded(int, 1, 65535, "a TCP port")


def _experiment_name(text: str) -> str:
    """`run --exp NAME`: a name (DVC checks the rest of git's ref rules); an empty one, as an
    unset `$NAME` gives, would otherwise mean "no experiment" and run in the workspace."""
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expected an experiment name without spaces, got "
                                         f"{text!r}")
    return text
MAX_SEED = 2**63 - 1  # config.MAX_SEED


def _add_wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="if another run is using this workspace, wait for it (saying so every "
                   "minute) instead of failing at once")


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", metavar="FILE", default=None,
                   help="params file to use instead of params.yaml (missing keys take defaults)")
    p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one parameter, e.g. -S prepare.resolution=32 "
                   "(VALUE is YAML, as in params.yaml: 'on' is text, true a bool); repeatable")


def _with_parents(*parents: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """An ArgumentParser class whose instances (every command's parser) take `parents`'
    options."""
    class Parser(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "parents": [*kwargs.get("parents", ()),
                                                              *parents]})
    return Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentforge",
        description="LatentForge: prepare -> judge -> tokenizer -> cache -> generator -> "
                    "posttrain -> rl -> evaluate, orchestrated by Prefect, versioned by DVC, "
                    "tracked in MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # -v after the command too (`latentforge stage prepare -v`, as the errors' hint reads):
    # SUPPRESS keeps a command's parser from resetting a -v given before the command.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging (tracebacks of errors included)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_with_parents(verbose))

    p = sub.add_parser("run", help="run the pipeline (DVC skips up-to-date stages)",
                       description="Run every DVC stage in graph order as a Prefect flow. -S and "
                       "--params write the resolved parameters into params.yaml first, as "
                       "`dvc exp run -S` does, so `dvc repro` afterwards agrees.")
    _add_params_args(p)
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    p.add_argument("--exp", metavar="NAME", default=None, type=_experiment_name,
                   help="run as the DVC experiment NAME in a temporary copy of the workspace "
                   "(dvc exp run --temp): params.yaml and the outputs here stay as they are; "
                   "`dvc exp show` lists it, `dvc exp apply NAME` brings it in")
    _add_wait_arg(p)

    p = sub.add_parser("stage", help="run one stage",
                       description="Inside `dvc repro` (DVC_STAGE set) this executes the stage; "
                       "from a shell it asks DVC to reproduce that one stage through Prefect.")
    p.add_argument("name", help="stage name (see dvc.yaml)")
    _add_params_args(p)
    p.add_argument("--force", action="store_true", help="rerun even if up to date")
    p.add_argument("--no-dvc", action="store_true",
                   help="execute directly, without DVC or Prefect (dvc.lock is not updated)")
    _add_wait_arg(p)

    p = sub.add_parser("params", help="print the resolved parameters as YAML")
    _add_params_args(p)
    p.add_argument("--explain", action="store_true", help="list every parameter with its doc")
    p.add_argument("--schema", action="store_true",
                   help="print params.yaml's JSON Schema (for editors; the Prefect Run form "
                        "is built from the same schema)")

    p = sub.add_parser("sample", help="sample images from the trained generator into a PNG grid")
    p.add_argument("--class", dest="cls", required=True, metavar="CLASS",
                   help="class name (e.g. 3) or index")
    p.add_argument("--n", type=_bounded(int, 1, MAX_SAMPLES, "a count"), default=64,
                   help="number of images")
    p.add_argument("--steps", type=_bounded(int, 1, MAX_SAMPLE_STEPS, "a step count"),
                   default=None, help="flow ODE steps (default: as the model's stage "
                   "sampled it; maskgit and ar sample as their generator stage set them)")
    p.add_argument("--cfg", type=_bounded(float, 0.0, None, "a CFG scale"), default=None,
                   help="CFG scale (default: as the model's stage sampled it: "
                   "generator.cfg_scale for a base generator, rl.cfg_scale for an RL one)")
    p.add_argument("--sampler", choices=["euler", "heun"], default=None,
                   help="flow ODE sampler (default: as the model's stage sampled it)")
    p.add_argument("--seed", type=_bounded(int, 0, MAX_SEED, "a seed"), default=0)
    p.add_argument("--model", default=None, help="generator folder or MLflow model URI "
                   "(models:/... or runs:/...); default: the pipeline's generator")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one logged with an "
                   "MLflow model, else the pipeline's)")
    p.add_argument("--decoder", default=None, help="post-trained decoder folder (default: "
                   "the one logged with an RL model, else artifacts/decoder where it is the "
                   "model's own: post-trained for this generator, or the one RL fine-tuned "
                   "through; none: the tokenizer's own decoder)")
    p.add_argument("--out", default="samples.png", help="PNG file to write")

    p = sub.add_parser("lineage", help="print a registered model's chain back to the source "
                       "data", description="Follow the upstream tags of a registered model "
                       "version (models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest) "
                       "through every stage's MLflow run back to the prepared data and its "
                       "source.")
    p.add_argument("model_uri", metavar="MODEL_URI")

    p = sub.add_parser("serve", help="serve Prefect deployments (pipeline and each stage) for the UI")
    p.add_argument("--limit", type=_bounded(int, 1, None, "a run count"), default=1,
                   help="concurrent runs (DVC allows one)")

    p = sub.add_parser("server", help="the background Prefect server that `run` starts and "
                       "reuses: status, start or stop",
                       description="`latentforge run` (and stage, ui) start one Prefect server in "
                       "the background on first use and reuse it, so a run does not wait for a "
                       "server and the Prefect UI shows every run. Its record and log are in "
                       "$PREFECT_HOME (~/.prefect). LATENTFORGE_PREFECT_SERVER=temporary starts "
                       "a server per command instead; a configured PREFECT_API_URL always wins.")
    p.add_argument("action", choices=["status", "start", "stop"], nargs="?", default="status")
    p.add_argument("--port", type=PORT, default=4200,
                   help="port to start on (the next free one if taken)")
    p.add_argument("--force", action="store_true",
                   help="stop: even while a run uses the server (the run then fails)")

    p = sub.add_parser("ui", help="start the Prefect server, the deployments and the MLflow UI "
                       "on 127.0.0.1; Ctrl-C stops the deployments and the MLflow UI (and a "
                       "temporary Prefect server; the background one stays up: `latentforge "
                       "server stop`)",
                       description="One command for the browser: a Prefect server (Run buttons "
                       "for the pipeline and each stage), `latentforge serve` and `mlflow ui` on "
                       "the project's store, all on 127.0.0.1.")
    p.add_argument("--prefect-port", type=PORT, default=4200, help="Prefect UI/API port")
    p.add_argument("--mlflow-port", type=PORT, default=5000, help="MLflow UI port")
    p.add_argument("--limit", type=_bounded(int, 1, None, "a run count"), default=1,
                   help="concurrent runs per deployment")
    return parser


def _load(args: argparse.Namespace) -> Any:
    from latentforge.config import load_params

    return load_params(args.params, args.overrides)


def _persist_params(args: argparse.Namespace, params: Any) -> None:
    """Write -S/--params into params.yaml, as `dvc exp run -S` does. Keys missing from
    params.yaml are written out too: dvc.yaml interpolates some and DVC tracks them all."""
    from latentforge.config import DEFAULT_PARAMS_FILE, write_params_file

    if write_params_file(params, DEFAULT_PARAMS_FILE):
        print(f"params.yaml updated from {args.params or ' '.join(args.overrides) or 'defaults'}",
              file=sys.stderr)


def _require_project() -> None:
    if not Path("dvc.yaml").exists():
        raise LatentForgeError(f"no dvc.yaml in {Path.cwd()}: run latentforge from the project "
                               "root (the folder with dvc.yaml and params.yaml)")
    if not Path(".dvc").is_dir():
        raise LatentForgeError(f"{Path.cwd()} is not a DVC repository: run `dvc init` first "
                               "(`make run` does it for you)")
    here = Path.cwd().resolve()
    if not any((d / ".git").exists() for d in (here, *here.parents)) and not _dvc_no_scm():
        # A copy without .git (a ZIP download): DVC would fail with a traceback (SCMError).
        raise LatentForgeError(f"{here} is not inside a git repository, and DVC versions the "
                               "pipeline through git: run `git init` here (a downloaded copy "
                               "has no .git), or `dvc config core.no_scm true` to go without")


def _dvc_no_scm() -> bool:
    """Whether the project's DVC config says `core.no_scm = true` (DVC then needs no git)."""
    import configparser

    config = configparser.ConfigParser(strict=False)  # a repeated section: the later wins
    with contextlib.suppress(configparser.Error, OSError):
        config.read([".dvc/config", ".dvc/config.local"])
    return config.get("core", "no_scm", fallback="false").strip().lower() in ("true", "1")


def cmd_params(args: argparse.Namespace) -> int:
    if args.schema:
        import json

        from latentforge.schema import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.explain:
        from latentforge.config import Params, explain, yaml_text
        from latentforge.dvcops import dotted_param

        try:  # what the user would run: params.yaml, --params, -S
            tree, code = _load(args).to_dict(), 0
        except ConfigError as exc:  # the documentation is wanted most just then
            print(f"error: {exc}\n(the values below are the defaults)", file=sys.stderr)
            tree, code = Params().to_dict(), 2
        for key, default, doc in explain():
            now = yaml_text(dotted_param(tree, key)[1])
            print(f"{key} = {now}" + ("" if now == default else f"  (default {default})")
                  + f"\n    {doc}")
        return code
    from latentforge.config import params_to_yaml

    sys.stdout.write(params_to_yaml(_load(args)))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from latentforge import paths

    if args.name not in paths.STAGES:
        raise ConfigError(f"unknown stage '{args.name}'; stages: {', '.join(paths.STAGES)}")
    inside_dvc = bool(os.environ.get("DVC_STAGE"))
    if inside_dvc and (args.params or args.overrides):
        raise ConfigError("inside `dvc repro` the parameters come from params.yaml only; "
                          "drop --params/-S (use `latentforge run -S ...` or `dvc exp run -S`)")
    if inside_dvc:
        from latentforge import workspace
        from latentforge.config import (
            DEFAULT_PARAMS_FILE,
            build_params,
            parse_params_bytes,
            read_params_bytes,
        )
        from latentforge.runner import execute_stage

        # The parameters and the bytes they came from, read once: a plain `dvc repro` checks
        # at the end that params.yaml still says the same (runner.check_params_unchanged).
        # No params.yaml means the defaults, as load_params gives them.
        text = read_params_bytes(DEFAULT_PARAMS_FILE) if Path(DEFAULT_PARAMS_FILE).exists() \
            else None
        raw = parse_params_bytes(text, DEFAULT_PARAMS_FILE) if text is not None else {}
        params = build_params(raw, DEFAULT_PARAMS_FILE)
        if workspace.held_by_parent():  # the `latentforge run` that started us holds it, and
            if text is not None:  # keeps dvc.lock true (dvcops.reproduce), with what we read
                from latentforge import paths, storage

                storage.write_bytes_atomic(paths.params_read_file(args.name), text)
            execute_stage(args.name, params)
        else:  # a plain `dvc repro`: hold the workspace as a `latentforge run` would
            with workspace.lock(what=f"dvc repro (stage {args.name})"):
                execute_stage(args.name, params, params_text=text)
        return 0
    params = _load(args)
    if args.no_dvc:
        from latentforge import tracking, workspace
        from latentforge.runner import execute_stage

        with workspace.lock():
            # The stage runs in this process: if it is SIGKILLed (the out-of-memory killer),
            # the guard ends its MLflow run, which would otherwise stay RUNNING.
            procs.start_guard()
            if params.tracking.enabled:
                procs.watch_mlflow(tracking.tracking_uri(), params.tracking.experiment)
            execute_stage(args.name, params)
        return 0
    return _orchestrate(args, params, stages=[args.name])


def cmd_run(args: argparse.Namespace) -> int:
    if args.exp is not None:  # `--exp ""` (an unset $NAME) must not run in the workspace
        return _experiment(args)
    return _orchestrate(args, _load(args), stages=None)


def _experiment(args: argparse.Namespace) -> int:
    """`run --exp NAME`: the pipeline as a DVC experiment; params.yaml is left alone."""
    from latentforge import prefectserver, procs, tracking

    if args.params:
        raise ConfigError("--exp takes its changes as -S KEY=VALUE; "
                          "--params would rewrite params.yaml")
    params = _load(args)
    _require_project()
    from latentforge import preflight
    from latentforge.flows.experiment import check_name

    check_name(args.exp)  # before a Prefect server is started and a flow run opened
    preflight.check_params(params, None)
    preflight.check_environment(params, None)
    procs.start_guard()
    if params.tracking.enabled:
        procs.watch_mlflow(tracking.tracking_uri(), params.tracking.experiment)
    from latentforge.flows.experiment import experiment

    with prefectserver.api_server():
        result = experiment(args.exp, overrides=args.overrides, force=args.force)
    print(f"experiment {result['experiment']} finished in {result['seconds']:.0f} s "
          f"(MLflow run {result['run_id'] or '-'}); `dvc exp show` lists it, "
          f"`dvc exp apply {result['experiment']}` brings it into the workspace")
    return 0


def warn_stale_upstream(stage: str, status: Any) -> list[str]:
    """Say so when a stage run alone reads outputs that DVC finds out of date (say after
    `stage evaluate -S generator.cfg_scale=2`): it runs on them as they are. Returns them."""
    stale = [s for s in status.order if s in status.upstream[stage] and s in status.changed]
    if stale:
        log.warning("%s runs on what the outputs of %s hold now, and DVC finds %s out of date: "
                    "`latentforge run` brings the chain up to date", stage, " and ".join(stale),
                    "them" if len(stale) > 1 else "it")
    return stale


def _orchestrate(args: argparse.Namespace, params: Any, stages: list[str] | None) -> int:
    """Run stages through Prefect and DVC, holding the workspace, with a guard that stops the
    children and ends the MLflow runs if this process is killed."""
    from latentforge import dvcops, preflight, workspace

    _require_project()
    with workspace.lock():
        preflight.check_params(params, stages)  # before params.yaml holds what cannot run
        _persist_params(args, params)
        status = dvcops.graph_status()
        if stages and len(stages) == 1:  # `stage NAME` runs NAME alone (DVC's --single-item)
            warn_stale_upstream(stages[0], status)
        if not args.force:  # every stage up to date: answered without the flow engine
            from latentforge.noop import try_noop

            records = try_noop(stages, status, remote=params.storage.remote)
            if records is not None:
                print(format_table(records))
                print(f"nothing ran: every stage is up to date (Prefect flow run "
                      f"{records[0]['prefect_flow_run']})", file=sys.stderr)
                return 0
        preflight.check_environment(params, stages)  # something will run
        from latentforge import prefectserver, tracking

        procs.start_guard()
        if params.tracking.enabled:
            procs.watch_mlflow(tracking.tracking_uri(), params.tracking.experiment)
        from latentforge.flows.pipeline import run_pipeline

        with prefectserver.api_server(), dvcops.known_status(status):
            records = run_pipeline(stages=stages, force=args.force)
    print(format_table(records))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from latentforge import paths
    from latentforge.images import make_grid, save_png
    from latentforge.tasks.generator import (
        has_sampling_record,
        load_generator,
        sampling_defaults,
    )

    if Path(args.out).is_dir():  # checked first: the error would name a temporary file
        raise ConfigError(f"--out {args.out}: a folder; give a file name, e.g. "
                          f"{Path(args.out) / 'samples.png'}")
    if Path(args.out).suffix.lower() != ".png":  # a PNG named x.jpg fools every viewer
        raise ConfigError(f"--out {args.out}: sample writes a PNG (lossless: the grid shows the "
                          f"samples as decoded); name it {Path(args.out).with_suffix('.png')}")
    model = args.model or str(paths.GENERATOR)
    if "://" in model or model.startswith(("models:/", "runs:/")):
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        from latentforge.lineage import existing_store, registered_models_note
        from latentforge.tracking import use_tracking_uri

        if model.startswith(("models:/", "runs:/")):  # read through the project's store:
            existing_store()  # a missing one is one line (MLflow would create an empty one)
        use_tracking_uri()
        # MLflow's loader resolves the logged folders (and the tokenizer logged beside the
        # generator) wherever they are stored.
        try:
            logged = mlflow.pyfunc.load_model(model).unwrap_python_model()
        except MlflowException as exc:
            log.debug("loading %s", model, exc_info=True)
            raise LatentForgeError(f"--model {model}: {str(exc).splitlines()[0]}" + (
                registered_models_note() if model.startswith("models:/") else "")) from None
        except Exception as exc:  # botocore's, reading artifacts on S3: MLflow lets them by
            from latentforge.storage import another_clients_error

            line = another_clients_error(exc, f"--model {model}: reading its artifacts")
            if line is None:
                raise
            log.debug("loading %s", model, exc_info=True)
            raise LatentForgeError(line) from None
        if getattr(logged, "kind", None) != "generator":
            raise ConfigError(f"--model {model}: a LatentForge {getattr(logged, 'kind', '?')} "
                              f"model, not a generator")
        if args.tokenizer or args.decoder == "none":  # not as logged (with its decoder)
            gen = load_generator(logged.artifacts["model_dir"], args.tokenizer or
                                 logged.artifacts.get("tokenizer_dir", paths.TOKENIZER))
        else:
            gen = logged.model
    else:
        gen = load_generator(model, args.tokenizer or paths.TOKENIZER)
    decoded_by = "the tokenizer's own decoder"
    if args.decoder != "none":
        from latentforge.tasks.posttrain import apply_decoder, decoder_for, read_meta

        if args.decoder:
            if read_meta(args.decoder) is None:
                raise ConfigError(f"--decoder {args.decoder}: no {args.decoder}/decoder.json "
                                  "(a posttrain stage output folder), or `none`")
            apply_decoder(gen.tokenizer, args.decoder)
            decoded_by = f"the decoder in {args.decoder}"
        else:  # the one the model's numbers were measured through, where it is here
            folder, decoded_by = decoder_for(gen)
            apply_decoder(gen.tokenizer, folder)
    names = gen.class_names
    if args.cls in names:
        index = names.index(args.cls)
    elif args.cls.isdigit() and int(args.cls) < len(names):
        index = int(args.cls)
    else:
        raise ConfigError(f"--class {args.cls!r} is not a class of this generator; classes: "
                          f"{', '.join(names)}")
    if gen.kind != "flow":  # taking them and sampling as before read as if they had acted
        ignored = [flag for flag, given in (("--steps", args.steps), ("--sampler", args.sampler))
                   if given is not None]
        if ignored:
            raise ConfigError(f"{' and '.join(ignored)}: the flow ODE's; this {gen.kind} "
                              "generator samples codes as its generator stage set it "
                              "(generator.maskgit_steps, temperature); drop them")
    # As the stage that made the model sampled it (RL: its rollout CFG), unless told otherwise;
    # a folder saved before it recorded that samples as params.yaml's generator section says.
    if has_sampling_record(gen.meta):
        fallback = None
    else:
        from latentforge.config import load_params

        fallback = load_params().generator
    options = sampling_defaults(gen.meta, fallback)
    for key, given in (("steps", args.steps), ("cfg_scale", args.cfg), ("sampler", args.sampler)):
        if given is not None:
            options[key] = given
    images = gen.sample_images(np.full(args.n, index), seed=args.seed, **options)
    rows = [images[i:i + 8] for i in range(0, len(images), 8)]
    save_png(make_grid(rows), args.out)
    how = (f"CFG {options['cfg_scale']:g}" if gen.kind != "flow" else
           f"CFG {options['cfg_scale']:g}, {options['steps']} {options['sampler']} steps")
    print(f"wrote {args.n} samples of class {names[index]!r} to {args.out} ({how}, seed "
          f"{args.seed}; decoded by {decoded_by})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _require_project()
    from latentforge import prefectserver
    from latentforge.flows.deployments import serve_all

    with prefectserver.api_server():  # the background server's UI then offers the Run buttons
        serve_all(limit=args.limit)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from latentforge import prefectbg

    if args.action == "start":
        started = prefectbg.start(port=args.port)
        print(f"Prefect server (pid {started.pid}) at {started.ui_url}; API {started.api_url}; "
              f"log {started.log}")
        return 0
    if args.action == "stop":
        stopped = prefectbg.stop(force=args.force)
        print(f"stopped the Prefect server (pid {stopped.pid}, {stopped.ui_url})" if stopped
              else "no background Prefect server was running")
        return 0
    record = prefectbg.running()
    configured = prefectbg.configured_api_url()
    if configured:
        print(f"PREFECT_API_URL is set ({configured}): commands use that API")
    if record is None:
        other = prefectbg.unusable()
        print(f"the recorded background Prefect server (pid {other.pid}, Prefect "
              f"{other.prefect_version}, {other.python}) runs; this environment has Prefect "
              f"{prefectbg.prefect_version()}, so the next `latentforge run` replaces it (or, "
              f"if it is another environment's, leaves it and uses a temporary server)"
              if other else
              "no background Prefect server is running; the next `latentforge run` starts one"
              if prefectbg.mode() == "background" and not configured else
              "no background Prefect server is running")
        return 3  # as `systemctl status` says "not running"
    print(f"Prefect server (pid {record.pid}, Prefect {record.prefect_version}) at "
          f"{record.ui_url}; API {record.api_url}; log {record.log}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from latentforge.lineage import cmd_lineage as lineage

    print(lineage(args.model_uri))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    _require_project()
    from latentforge.ui import run_ui

    return run_ui(args.prefect_port, args.mlflow_port, args.limit)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The end-of-run table: stage, ran/skipped, duration, key metrics, MLflow run id."""
    header = ("stage", "status", "seconds", "key metrics", "mlflow run")
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:4])
        rows.append((r["stage"], r["status"], f"{r.get('seconds', 0):.1f}", shown,
                     r.get("run_id") or "-"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*row) for row in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (main() may be called repeatedly in one
    process, e.g. by tests that swap stderr)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def _configure_logging(level: int) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(procs.LOG_FORMAT, datefmt=procs.LOG_DATEFMT))
        root.addHandler(handler)
    root.setLevel(level)


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "params": cmd_params, "sample": cmd_sample,
            "serve": cmd_serve, "ui": cmd_ui, "lineage": cmd_lineage, "server": cmd_server}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    tune_malloc()  # stages train, encode and sample in this process
    # No phoning home from a pipeline run (Ray's usage stats are off too, raycluster.py):
    # offline, the temporary Prefect server's start-up telemetry logs an ERROR
    # ("Failed to send telemetry") that reads like a failed run. Users can set it to true.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for noisy in ("httpx", "httpcore", "alembic", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    procs.install_interrupt_handlers()
    procs.invocation_id()  # every child and MLflow run of this command carries it
    if getattr(args, "wait", False):
        from latentforge.workspace import WAIT_ENV

        os.environ[WAIT_ENV] = "1"  # the flows (in this process) read it
    try:
        code = COMMANDS[args.command](args)
    except LatentForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM, after every `finally` has run
        signum = exc.signum if isinstance(exc, procs.Interrupted) else signal.SIGINT
        log.debug("interrupted", exc_info=True)
        with procs.interrupts_deferred():
            if ended := procs.end_invocation_runs():
                log.warning("ended %d MLflow run(s) of this command KILLED (their stage was "
                            "stopped before it could)", ended)
        killed = "; MLflow runs of this command ended KILLED" \
            if args.command in ("run", "stage") and procs.mlflow_watched() else ""
        print(f"interrupted ({signal.Signals(signum).name}): stopped{killed}", file=sys.stderr)
        code = 128 + signum
    except OSError as exc:  # a full disk, a missing or unreadable file: one line, no traceback
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            # `latentforge params --explain | head`: the reader took what it wanted. Quiet, as
            # a tool killed by SIGPIPE is; stdout goes nowhere so exit's flush cannot fail.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 128 + signal.SIGPIPE
        else:
            log.debug("%s failed", args.command, exc_info=True)
            print(f"error: {describe_os_error(exc)}", file=sys.stderr)
            code = 1
    except Exception as exc:  # the MLflow store or the Prefect API failing mid-run: one line
        from latentforge.prefectserver import describe_api_error
        from latentforge.tracking import describe_store_error, tracking_uri

        line = describe_store_error(exc, tracking_uri()) or describe_api_error(exc)
        if line is None:
            raise
        log.debug("%s failed", args.command, exc_info=True)
        print(f"error: {line}", file=sys.stderr)
        code = 1
    finally:
        procs.stop_guard()
    if argv is None:  # the program itself (console script, python -m), not a caller in Python
        exit_now(code)
    return code


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (as `head` does when it has enough)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test's capture)
        return False


def exit_now(code: int) -> NoReturn:
    """End the process once its work is done: the atexit handlers run (logging, Ray, MLflow)
    and the streams are flushed, then the process exits without the interpreter's teardown of
    every module, which took 1.4-3 s after a stage on 2 busy cores (torch and its libraries,
    MLflow's SQLAlchemy objects freed one by one): 10-20 s of a seven-stage pipeline run."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to say
            stream.flush()
    os._exit(code)


def describe_os_error(exc: OSError) -> str:
    """`no space left on device: PATH` rather than a traceback (`-v` logs the traceback)."""
    what = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        what = "no space left on device"
    elif isinstance(exc, FileNotFoundError):
        what = "file not found"
    elif isinstance(exc, PermissionError):
        what = "permission denied"
    where = exc.filename if exc.filename is not None else "(file not named by the system)"
    extra = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"{what}: {where}{extra} (run with -v for the traceback)"
