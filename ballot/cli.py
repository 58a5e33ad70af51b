"""The `ballot` command: the pipeline's operations for people outside DVC."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ballot.config import (
    GRANULARITIES,
    UNIT_METHODS,
    BaseConfig,
    ExperimentConfig,
    apply_overrides,
    experiment_from_params,
    load_yaml,
    to_dict,
)
from ballot.errors import ConfigError, StorageError, UserError
from ballot.processes import stop_children
from ballot.summary import summary

if TYPE_CHECKING:
    from ballot.data import DataBundle
    from ballot.pruning import DenseArtifacts
# The training stack (torch) is imported where a command needs it, so `ballot serve` runs without it.


def _flag_overrides(flags: dict[str, Any]) -> list[str]:
    """'group.key=value' overrides for the command-line flags that were given (None = not given)."""
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]


def _config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    params: dict[str, Any] = load_yaml(args.params) if args.params else {}
    flags = {"base.dataset": args.dataset, "base.model": args.model, "base.density": args.density,
             "base.seed": args.seed, "prune.method": getattr(args, "method", None), "base.device": args.device,
             "prune.granularity": getattr(args, "granularity", None)}
    params = apply_overrides(params, _flag_overrides(flags) + list(args.set or []))
    return experiment_from_params(params)


def _summary(metrics: dict[str, Any]) -> str:
    return (f"acc {metrics['acc']:.4f}  cwv {metrics['cwv']:.5f}  mcd {metrics['mcd']:.4f}  "
            f"worst-class {metrics['worst_class']:.4f}")


def _field_help(config_class: type, name: str) -> str:
    """The help text of a configuration field (ballot/config.py is the reference)."""
    return next(f.metadata["help"] for f in dataclasses.fields(config_class) if f.name == name)


def _read_json(path: Path) -> Any:
    """A JSON file of a `ballot prune` folder; StorageError naming it when it is missing or malformed."""
    from ballot.storage import read_json

    return read_json(path, f"'{path.parent}' has no {path.name}: is it the --out folder of `ballot prune`?")


def _run_folder(path: str, export_overrides: Sequence[str] = ()) -> tuple[Path, ExperimentConfig]:
    """(folder, the configuration it was pruned with) of a `ballot prune` output folder, with ``export_overrides``
    ('export.KEY=VALUE': only those, the other settings decided the model) applied."""
    from ballot.experiment import RUN_CONFIG

    outside = [item for item in export_overrides if not item.startswith("export.")]
    if outside:
        raise ConfigError(f"--set {outside[0]}: only export.* settings can change here; the others are the run's "
                          f"own ({RUN_CONFIG})")
    folder = Path(path)
    if not folder.is_dir():
        raise StorageError(f"'{folder}' is not a folder: pass the --out folder of `ballot prune`")
    params = _read_json(folder / RUN_CONFIG)
    if not isinstance(params, dict):
        raise StorageError(f"'{folder / RUN_CONFIG}' does not hold a configuration (a JSON object)")
    return folder, experiment_from_params(apply_overrides(params, list(export_overrides)))


def _data(cfg: ExperimentConfig, method: str | None = None) -> DataBundle:
    """The prepared data, after one line on its sizes and the notes before training (``notices_before_training``:
    schedules min_steps lengthens, parameters no method prunes)."""
    from ballot import experiment

    data = experiment.prepare_data(cfg)
    print(f"data: {cfg.base.dataset}  train {len(data.train)}  val {len(data.val)}  test {len(data.test)}  "
          f"classes {data.num_classes}", file=sys.stderr)
    for line in experiment.notices_before_training(cfg, data, method):
        print(line, file=sys.stderr)
    return data


def _dense_states(cfg: ExperimentConfig, data: DataBundle, reuse: str | None, out: Path
                  ) -> tuple[DenseArtifacts, Path, float, dict[str, Any]]:
    """(dense states, their folder, seconds spent training, the dense model's metrics): reused from ``reuse``
    when it holds them, else trained and saved there (whole or not at all) or under out/dense."""
    from ballot import distributed, experiment
    from ballot.storage import staged_folder

    dense_dir = Path(reuse) if reuse else out / "dense"
    missing = [n for n in experiment.DENSE_FILES.values() if not (dense_dir / n).exists()]
    if reuse and missing and dense_dir.is_dir() and any(dense_dir.iterdir()):  # saving replaces the folder whole
        raise ConfigError(f"--dense '{dense_dir}' holds other files but not the dense states ({', '.join(missing)} "
                          "missing); point it at a new folder or at one a run saved dense states in")
    if reuse and not missing:
        experiment.check_dense_reuse(dense_dir, cfg, data)
        dense, seconds = experiment.load_dense(dense_dir), 0.0
        model = experiment.new_model(cfg, data)
        model.load_state_dict(dense.trained_state)
        print(f"dense: reusing {dense_dir}", file=sys.stderr)
    else:
        (model, dense, _), seconds = experiment.timed(experiment.train_dense, cfg, data)
        if not reuse:  # into this process's output folder
            experiment.save_dense(dense, dense_dir, cfg, data)
        elif distributed.is_main():  # one process writes the shared --dense folder
            with staged_folder(dense_dir) as staged:
                experiment.save_dense(dense, staged, cfg, data)
    dense_metrics = experiment.model_metrics(model, data, cfg.base.device)
    print(f"dense:  {_summary(dense_metrics)}  ({seconds:.1f}s)", file=sys.stderr)
    warning = experiment.weak_dense_warning(dense_metrics["val"])
    if warning:
        print(warning, file=sys.stderr)
    return dense, dense_dir, seconds, dense_metrics


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(f"{option}="):
            kept.append(item)
    return kept


LAUNCHER_SELF_STOP_S = 3  # how long an interrupted launcher is given to stop by itself (a terminal's Ctrl-C)
LAUNCHER_GRACE_S = 40  # then, after a SIGTERM, before it is killed (torchrun's own grace for its workers is 30 s)


def _relaunch(processes: int, argv: list[str]) -> int:
    """This same command in ``processes`` data-parallel processes on this machine (torchrun); its exit code, 2
    (with the lowest-ranked process's error as the last line) when a process stopped on bad input. The launcher
    dies with this process (a SIGTERM from the kernel, which it passes to its workers), and an interrupt stops it
    and its workers before this process returns, so no worker is left to write --out later (the workers end with
    the launcher: ``distributed.start``)."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "ballot.processes", str(os.getpid()),  # the launcher ends with this process
                   "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "--log-dir", str(Path(folder) / "logs"),  # not a torchelastic_* folder left in /tmp
                   "-m", "ballot.cli", *_without_option(argv, "--nproc")]
        errors_dir = Path(folder) / "errors"
        errors_dir.mkdir()
        launcher = subprocess.Popen(command, env={**os.environ, ERROR_DIR_ENV: str(errors_dir)})
        try:
            code = launcher.wait()
        except KeyboardInterrupt:
            stop_children([launcher], LAUNCHER_SELF_STOP_S, LAUNCHER_GRACE_S)
            raise
        code = code if code >= 0 else 128 - code  # a launcher ended by a signal: the shell's status for it
        errors = sorted(errors_dir.iterdir(), key=lambda path: int(path.name))
        if code and errors:
            print(f"ballot: error: {errors[0].read_text()}", file=sys.stderr)
            return 2
    return code


@contextlib.contextmanager
def _rank_output(out: Path) -> Iterator[Path]:
    """The staged output folder on rank 0 (the only process that writes or prints); a scratch folder elsewhere."""
    from ballot import distributed
    from ballot.storage import staged_folder

    if distributed.is_main():
        with staged_folder(out) as folder:  # the output folder is replaced only when everything succeeded
            yield folder
        return
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        yield Path(scratch)


def cmd_prune(args: argparse.Namespace) -> int | None:
    import torch

    from ballot import distributed, experiment

    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
    cfg, tuned = _with_best(_config_from_args(args), args.best)
    experiment.check_experiment(cfg, processes=max(args.nproc, distributed.requested_processes()))
    _check_replaceable(Path(args.out), args.dense)
    device = experiment.usable_device(cfg.base.device, "base.device")
    if args.nproc > 1 and not distributed.requested():
        if device.type == "cuda" and torch.cuda.device_count() < args.nproc:
            raise ConfigError(f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              "one per process is needed; use fewer processes or --device cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if device.type == "cpu" and args.nproc > cores:
            raise ConfigError(f"--nproc {args.nproc}: this process may use {cores} CPU core(s), and more processes "
                              "than cores only slow each other down; use at most that many")
        return _relaunch(args.nproc, args.argv)
    distributed.start(device)
    try:
        _prune(cfg, args, tuned)
    finally:
        distributed.stop()
    return None


def _with_best(cfg: ExperimentConfig, best: str | None) -> tuple[ExperimentConfig, dict[str, Any] | None]:
    """(``cfg`` with the tuned values of the best_params.yaml at ``best`` applied, those values); (``cfg``, None)
    without ``best``. ConfigError when the file is missing or the method is not Ballot, whose knobs it holds."""
    from ballot.tuning.space import load_best, with_values

    if best is None:
        return cfg, None
    if not Path(best).is_file():
        raise ConfigError(f"--best '{best}' not found: give the best_params.yaml `ballot tune --out DIR` wrote")
    if cfg.prune.method != "ballot":
        raise ConfigError(f"--best applies tuned Ballot values; prune.method is '{cfg.prune.method}'")
    values = load_best(best)
    return with_values(cfg, values), values


def _check_replaceable(out: Path, dense: str | None) -> None:
    """ConfigError unless a run may replace ``out`` whole: it is new, empty or an earlier run's output, and the
    ``--dense`` folder, which outlives runs, does not lie inside it."""
    from ballot.experiment import RUN_CONFIG

    _check_dense_folder(dense)
    _check_writable(out, "--out", replaced_whole=True)
    if dense and Path(dense).resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--dense '{dense}' lies inside --out '{out}', which every run replaces whole; keep the "
                          f"dense states beside it (e.g. --dense {out.parent / 'dense'})")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUN_CONFIG).is_file())):
        raise ConfigError(f"--out '{out}' exists and is not a `ballot prune` output (no {RUN_CONFIG}); a run "
                          "replaces its folder whole, so choose a new folder or an earlier run's")


def _check_writable(path: Path, flag: str, replaced_whole: bool) -> None:
    """ConfigError, before any work, when the folder a run writes ``path`` in is read-only: ``path`` itself when it
    is an existing folder written inside, else the nearest existing folder above it (where ``path`` is made, or
    replaced whole when ``replaced_whole``)."""
    if path.is_dir() and not replaced_whole:
        folder = path
    else:
        folder = next((above for above in path.absolute().parents if above.exists()), Path("/"))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} '{path}': cannot write in '{folder}' (permission denied)")


def _check_dense_folder(dense: str | None) -> None:
    """ConfigError when ``--dense`` names something that is not a folder (saving there would replace it), or a new
    folder that cannot be made (an existing one may be only read)."""
    if dense and Path(dense).exists() and not Path(dense).is_dir():
        raise ConfigError(f"--dense '{dense}' is not a folder: give the folder that holds (or will hold) the dense "
                          "states")
    if dense and not Path(dense).exists():
        _check_writable(Path(dense), "--dense", replaced_whole=True)


def _prune(cfg: ExperimentConfig, args: argparse.Namespace, tuned: dict[str, Any] | None) -> None:
    from ballot import experiment

    out = Path(args.out)
    with _rank_output(out) as folder:
        if tuned is not None:
            print(f"prune: applying {len(tuned)} tuned value(s) from {args.best}", file=sys.stderr)
        data = _data(cfg)
        dense, _, dense_seconds, dense_metrics = _dense_states(cfg, data, args.dense, folder)
        result, prune_seconds = experiment.timed(experiment.run_prune, cfg, data, dense)
        metrics = experiment.model_metrics(result.model, data, cfg.base.device)
        worst = metrics["worst_class_index"]
        metrics.update(method=cfg.prune.method, dataset=cfg.base.dataset, model=cfg.base.model, seed=cfg.base.seed,
                       density=result.mask.density(), target_density=cfg.base.density,
                       worst_class_name=data.class_names[worst] if worst >= 0 else None,
                       dense={key: dense_metrics[key] for key in ("acc", "cwv", "mcd", "worst_class")},
                       seconds={"dense": dense_seconds, "prune": prune_seconds})
        experiment.save_pruned(folder, result, metrics, cfg, tuned_params=tuned)
        print(f"{cfg.prune.method}: done in {prune_seconds:.1f}s; writing {out}/mask.safetensors, "
              f"model.safetensors, metrics.json", file=sys.stderr)
        print(summary({**metrics, "final_choice": result.final_choice}))
        warning = experiment.lost_learning_warning(metrics["val"], dense_metrics["val"])
        if warning:
            print(warning, file=sys.stderr)


ERROR_DIR_ENV = "BALLOT_ERROR_DIR"  # where each relaunched process leaves its one-line error, named by its rank
TUNE_FLAGS = {"n_trials": "tune.n_trials", "timeout": "tune.timeout_s", "workers": "tune.workers",
              "storage": "tune.storage", "study_name": "tune.study_name"}


def cmd_tune(args: argparse.Namespace) -> None:
    """Run, resume or join the Optuna study over Ballot's knobs; write best_params.yaml and report/."""
    from ballot import experiment
    from ballot.storage import staged_folder
    from ballot.tracking import connect, resolve_tracking_uri
    from ballot.tuning.report import no_choice_reason
    from ballot.tuning.runner import run_study
    from ballot.tuning.space import check_space
    from ballot.tuning.study import make_storage

    args.set = [*(args.set or []), *_flag_overrides({key: getattr(args, dest) for dest, key in TUNE_FLAGS.items()})]
    cfg = _config_from_args(args)
    experiment.check_experiment(cfg)
    check_space(cfg)  # a knob the configuration does not have fails now, not after the dense model is trained
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is not a folder: give the folder for the study, best_params.yaml and the "
                          "report")
    _check_dense_folder(args.dense)
    _check_writable(out, "--out", replaced_whole=False)
    # a tracking store or storage that cannot be used fails before the dense model is trained (the storage's tables
    # are created on opening, so the tracking store is checked first)
    connect(resolve_tracking_uri(cfg.register.tracking_uri, args.tracking_uri))
    if cfg.tune.storage:
        make_storage(cfg.tune.storage, cfg.tune.heartbeat_s)
    data = _data(cfg, method="ballot")  # every trial runs Ballot
    dense, dense_dir, _, _ = _dense_states(cfg, data, args.dense, out)
    with staged_folder(out / "report") as report:  # replaced whole, once the study is reported
        outcome = run_study(cfg, data, dense, dense_dir=dense_dir, best_path=out / "best_params.yaml",
                            report_dir=report, default_storage=out / "study.db", tracking_uri=args.tracking_uri)
    s, trials = outcome.summary, outcome.summary["trials"]
    print(f"tune: study {s['study']}: {trials['finished']} of {s['n_trials_requested']} trials finished "
          f"({trials['pruned']} pruned, {trials['failed']} failed, {trials['infeasible']} infeasible); "
          f"epochs run {s['epochs']['run']} of {s['epochs']['planned']} planned", file=sys.stderr)
    for label in ("best", "baseline"):
        row = s[label]
        if row and "objective" in row:
            print(f"tune: {label} trial {row['number']}: objective {row['objective']:.4f}  val acc "
                  f"{row['val_acc']:.4f}  cwv {row['val_cwv']:.5f}  mcd {row['val_mcd']:.4f}", file=sys.stderr)
    if outcome.chosen is None:
        print(f"tune: {no_choice_reason(s, cfg.tune.max_acc_drop)}. best_params.yaml has no params, so prune keeps "
              f"its own values", file=sys.stderr)
    print(f"wrote {out}/best_params.yaml, {out}/report/", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ballot import experiment

    folder, cfg = _run_folder(args.dir)
    if args.device is not None:
        device = str(experiment.usable_device(args.device, "--device"))
    else:  # the run's own device where this machine has it, so the metrics reproduce exactly
        try:
            device = str(experiment.usable_device(cfg.base.device, "base.device"))
        except ConfigError:
            device = str(experiment.usable_device("auto", "--device"))
            print(f"evaluate: the run's device '{cfg.base.device}' is not available here; evaluating on {device}",
                  file=sys.stderr)
    data = experiment.prepare_data(cfg)
    model, mask = experiment.load_pruned(folder, cfg, data)
    metrics = experiment.model_metrics(model, data, device)
    metrics["density"] = mask.density()
    print(json.dumps({k: metrics[k] for k in ("acc", "cwv", "mcd", "worst_class", "density", "per_class")}, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    """A `ballot prune` folder as one ONNX file (masks baked in, model card inside), checked against PyTorch."""
    from ballot import experiment
    from ballot.export import describe, export_run

    out = Path(args.out)
    if out.is_dir():
        raise StorageError(f"--out '{out}' is a folder: give the path of the .onnx file to write")
    if out.suffix.lower() != ".onnx":  # so it can never overwrite one of the run's own files
        raise ConfigError(f"--out '{out}' does not end in .onnx: give the path of the .onnx file to write")
    folder, cfg = _run_folder(args.dir, args.set or [])
    metrics = _read_json(folder / "metrics.json")
    data = experiment.prepare_data(cfg)
    model, mask = experiment.load_pruned(folder, cfg, data)
    report = export_run(model, mask, data, cfg, metrics, out)
    print("\n".join(describe(report)) + f" -> {out}", file=sys.stderr)


def _project_config(path: str | None, flags: dict[str, Any]) -> ExperimentConfig:
    """The params file (default ./params.yaml when present, else the built-in defaults) with ``flags`` applied."""
    path = path or ("params.yaml" if Path("params.yaml").is_file() else None)
    return experiment_from_params(apply_overrides(load_yaml(path) if path else {}, _flag_overrides(flags)))


def cmd_register(args: argparse.Namespace) -> None:
    """One MLflow run that registers an exported ONNX file as a new version, with its model card as tags."""
    from ballot import tracking
    from ballot.export import read_metadata

    cfg = _project_config(args.params, {"register.model_name": args.name, "register.experiment": args.experiment})
    card = read_metadata(args.onnx)
    tracking.connect(tracking.resolve_tracking_uri(cfg.register.tracking_uri, args.tracking_uri))
    registration = tracking.register_run(args.onnx, cfg.register.model_name, None, card,
                                         experiment=cfg.register.experiment, alias=args.alias,
                                         metrics=tracking.numeric_metrics(card))
    print(f"registered {registration.name} version {registration.version} as {registration.model_uri} "
          f"(run {registration.run_id}, {registration.tracking_uri})")


def cmd_promote(args: argparse.Namespace) -> int:
    """Move alias champion to a registered version if it passes the gate; 1 when refused."""
    from ballot.promote import promote
    from ballot.tracking import connect, resolve_tracking_uri

    cfg = _project_config(args.params, {"promote.max_acc_drop": args.max_acc_drop,
                                        "promote.cwv_tolerance": args.cwv_tolerance})
    client = connect(resolve_tracking_uri(cfg.register.tracking_uri, args.tracking_uri))
    decision = promote(client, args.name, args.version, cfg.promote)
    print(decision.message())
    return 0 if decision.promoted else 1


def cmd_config(args: argparse.Namespace) -> None:
    import yaml

    print(yaml.safe_dump(to_dict(_config_from_args(args)), sort_keys=False), end="")


SERVE_FLAGS = {  # flag -> (setting, type, help); each also has an environment variable (docs/serving.md)
    "--model-uri": ("model_uri", str, "an .onnx file, models:/NAME@ALIAS or models:/NAME/VERSION "
                                      "(default models:/ballot-fashion-mnist@champion)"),
    "--tracking-uri": ("tracking_uri", str, "MLflow tracking/registry URI for models:/ URIs"),
    "--host": ("host", str, "address to listen on (default 127.0.0.1)"),
    "--port": ("port", int, "port to listen on (default 8000)"),
    "--device": ("device", str, "auto: CUDA when available, else CPU"),
    "--threads": ("threads", int, "ONNX Runtime intra-op threads (0 = automatic)"),
    "--max-batch": ("max_batch", int, "most items per /predict request (default 256)"),
    "--max-body-bytes": ("max_body_bytes", int, "largest request body (default 16 MiB)"),
    "--read-timeout": ("read_timeout", float, "seconds a request may take to arrive in full (default 10)"),
    "--max-connections": ("max_connections", int, "open connections beyond which new requests get 503 (default 128)"),
    "--registry-timeout": ("registry_timeout", float, "seconds each registry request may take at start-up "
                                                      "(default 15)"),
    "--log-level": ("log_level", str, "uvicorn log level (default info)"),
}


def cmd_serve(args: argparse.Namespace) -> None:
    """Run the HTTP service until stopped; flags override the BALLOT_* environment variables."""
    from serving.server import main as serve  # imported here: other commands need no HTTP stack

    code = serve({setting: getattr(args, setting) for setting, _, _ in SERVE_FLAGS.values()})
    if code:
        raise SystemExit(code)


def _add_run_options(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    from ballot.data import DATASETS
    from ballot.models import MODELS
    from ballot.pruning import PRUNERS

    parser.add_argument("--params", help="params.yaml to start from (default: built-in defaults)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="dataset (base.dataset)")
    parser.add_argument("--model", choices=sorted(MODELS), help="model (base.model)")
    if with_method:
        parser.add_argument("--method", choices=sorted(PRUNERS), help="pruning method (prune.method)")
        parser.add_argument("--granularity", choices=GRANULARITIES,
                            help=f"prune.granularity: weight, or unit for {' and '.join(UNIT_METHODS)}")
    parser.add_argument("--density", type=float, help="fraction of prunable weights kept, in (0, 1]")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--device", help=_field_help(BaseConfig, "device"))
    parser.add_argument("--set", action="append", metavar="GROUP.KEY=VALUE",
                        help="override any parameter, e.g. --set prune.ballot.conflict_threshold=0.3")


def build_parser(serve_only: bool = False) -> argparse.ArgumentParser:
    """The whole command line, or (``serve_only``) just `ballot serve`, whose parser imports no training code."""
    from serving.settings import DEVICES, LOG_LEVELS  # here: importing this module needs no serving package

    parser = argparse.ArgumentParser(prog="ballot", description="Fair sparse neural networks: prune, evaluate, ship.")
    parser.add_argument("--version", action="version", version=f"ballot {metadata.version('ballot')}")
    commands = parser.add_subparsers(dest="command", required=True)

    if not serve_only:  # the other commands' options name the registries, which import torch
        prune = commands.add_parser("prune", help="train dense, prune with a method, retrain; write mask, weights, "
                                                  "metrics")
        _add_run_options(prune)
        prune.add_argument("--out", required=True, help="output folder")
        prune.add_argument("--dense", help="folder of dense states to reuse (written there when absent)")
        prune.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine, started "
                                                                  "through torchrun (docs/scale.md; default 1)")
        prune.add_argument("--best", help="a best_params.yaml of `ballot tune` whose tuned values Ballot applies "
                                          "over the configuration (the pipeline's prune stage: tune.use_best)")
        prune.set_defaults(func=cmd_prune)

        tune = commands.add_parser("tune", help="Optuna study over Ballot's knobs (tune.*): run, resume or join it; "
                                                "write best_params.yaml and report/ (docs/tuning.md)")
        _add_run_options(tune, with_method=False)
        tune.add_argument("--out", required=True, help="output folder (study.db when --storage is not given)")
        tune.add_argument("--dense", help="folder of dense states to reuse (written there when absent); workers "
                                          "joining one study must share it")
        tune.add_argument("--n-trials", type=int, help="finished trials the study must hold (tune.n_trials)")
        tune.add_argument("--timeout", type=float, help="start no new trial after this many seconds (tune.timeout_s)")
        tune.add_argument("--workers", type=int, help="worker processes, one torch thread each (tune.workers)")
        tune.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user@host:5432/db (tune.storage)")
        tune.add_argument("--study-name", help="study name (tune.study_name; default: from the configuration)")
        tune.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                                 "register.tracking_uri)")
        tune.set_defaults(func=cmd_tune)

        evaluate = commands.add_parser("evaluate", help="re-evaluate a `ballot prune` output folder on the test split")
        evaluate.add_argument("--dir", required=True, help="output folder of `ballot prune`")
        evaluate.add_argument("--device", help="where to evaluate (default: the run's device where this machine "
                              "has it, else auto: cuda when available, else cpu)")
        evaluate.set_defaults(func=cmd_evaluate)

        export = commands.add_parser("export", help="write a `ballot prune` output folder as one ONNX file (masks "
                                                    "baked in, model card inside), checked against PyTorch")
        export.add_argument("--dir", required=True, help="output folder of `ballot prune`")
        export.add_argument("--out", required=True, help="ONNX file to write, ending in .onnx (replaced only when "
                                                         "the parity check passes)")
        export.add_argument("--set", action="append", metavar="export.KEY=VALUE",
                            help="change an export setting of the run (e.g. export.quantize=static); repeatable")
        export.set_defaults(func=cmd_export)

        register = commands.add_parser("register", help="register an exported ONNX file as a new version in the MLflow "
                                                        "model registry, with an alias")
        register.add_argument("--onnx", required=True, help="ONNX file written by `ballot export` or the export stage")
        register.add_argument("--name", help="registered model name (default: register.model_name)")
        register.add_argument("--alias", default="challenger", help="alias pointed at the new version (default "
                                                                    "challenger; champion moves only through promote)")
        register.add_argument("--experiment", help="MLflow experiment of the run (default: register.experiment)")
        register.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                     "else register.tracking_uri of the params file)")
        register.add_argument("--params", help="params file with the register group (default: ./params.yaml when "
                                               "present)")
        register.set_defaults(func=cmd_register)

        promote = commands.add_parser("promote", help="move alias champion to a registered version if it passes the "
                                                      "accuracy and fairness gate (exit 1 when refused)")
        promote.add_argument("--name", required=True, help="registered model name")
        promote.add_argument("--version", required=True, help="model version to promote")
        promote.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                    "else register.tracking_uri of the params file)")
        promote.add_argument("--params", help="params file with the promote group (default: ./params.yaml when "
                                              "present)")
        promote.add_argument("--max-acc-drop", type=float, help="override promote.max_acc_drop")
        promote.add_argument("--cwv-tolerance", type=float, help="override promote.cwv_tolerance")
        promote.set_defaults(func=cmd_promote)

        config = commands.add_parser("config", help="print the resolved configuration as YAML")
        _add_run_options(config)
        config.set_defaults(func=cmd_config)

    serve = commands.add_parser("serve", help="serve a registered model (or an .onnx file) over HTTP with ONNX Runtime")
    choices = {"device": DEVICES, "log_level": LOG_LEVELS}
    for flag, (setting, kind, text) in SERVE_FLAGS.items():
        serve.add_argument(flag, dest=setting, type=kind, choices=choices.get(setting), help=text)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(serve_only=args_in[:1] == ["serve"]).parse_args(args_in)
    args.argv = args_in
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        code = func(args)
    except UserError as error:
        _report(error)
        return 2
    except KeyboardInterrupt:
        if _speaks():
            print("ballot: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except OSError as error:
        if error.filename is None:  # not about a file or folder: a defect or the network, shown whole
            raise
        _report(StorageError(f"{error.strerror or error}: '{error.filename}'"))
        return 2
    return code or 0


def _report(error: UserError) -> None:
    """``error`` as the one line ``ballot: error: ...`` on stderr, from the process that speaks (``_speaks``); a
    worker of the --nproc launcher leaves it in the launcher's folder instead, and the launcher prints the
    lowest-ranked one."""
    if ERROR_DIR_ENV in os.environ:
        (Path(os.environ[ERROR_DIR_ENV]) / os.environ.get("RANK", "0")).write_text(str(error))
    elif _speaks():
        print(f"ballot: error: {error}", file=sys.stderr)


def _speaks() -> bool:
    """Whether this process prints a run's last line: not a worker of the --nproc launcher, and rank 0 of a run
    torchrun started (a stray RANK without the rest of torchrun's environment silences nothing)."""
    if ERROR_DIR_ENV in os.environ:
        return False
    return os.environ.get("RANK", "0") == "0" or "MASTER_ADDR" not in os.environ


if __name__ == "__main__":
    sys.exit(main())
