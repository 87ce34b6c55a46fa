"""The experiment registry: discovery, registration and config resolution.

An experiment is a module ``flatlab/experiments/<name>.py`` that defines a pydantic ``Config``
and a ``run(cfg, run)`` function decorated with :func:`register`. Modules are found with
:mod:`pkgutil` (no central list); one that fails to import is remembered with its error, so
``flatlab list`` still works and ``flatlab run <that name>`` reports the import error.

Config resolution (:func:`resolve_config`) layers, lowest to highest priority: the Config
defaults, a YAML/TOML file, ``quick=True`` from ``--quick``, the experiment's quick preset
(only when the config ends up with ``quick=True``, however it was set), then ``--set a.b=c``
overrides. The preset is the one place an experiment shrinks itself for ``--quick``: its
``run`` reads the resolved sizes and never ``cfg.quick``, so a preview's ``config.json`` and
report show the sizes that actually ran, and a ``--set`` beside ``--quick`` is never ignored.
Unknown keys and badly typed values raise :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from flatlab.rundir import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib


def _existing_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"directory does not exist: {path}")
    return path


_existing_dir.constraint = "an existing folder"  # type: ignore[attr-defined]

#: A config field type for data directories: validated to exist when the config is built.
ExistingDir = Annotated[Path, AfterValidator(_existing_dir)]


def parts_of(known: Sequence[str]) -> Any:
    """A config field type for an experiment's ``parts`` selector: a list of names, each one
    of ``known`` (else a ValueError naming the unknown ones)."""
    known = tuple(known)

    def check(v: list[str]) -> list[str]:
        bad = [p for p in v if p not in known]
        if bad:
            raise ValueError(f"parts must be among {list(known)}, got {bad}")
        return v

    check.constraint = "each one of " + "|".join(known)  # type: ignore[attr-defined]
    return Annotated[list[str], AfterValidator(check)]


class ExperimentConfig(BaseModel):
    """Base class of every experiment ``Config``: strict keys, a seed, and the ``quick`` switch.

    Subclasses add fields, each with a default and a ``description`` (shown by
    ``flatlab run NAME --help``). Nested settings are nested ``BaseModel`` fields, reached on the
    command line as ``--set model.width=64``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    quick: bool = Field(False, description="short version of the run (for tests and previews)")
    seed: int = Field(0, description="seed for torch, numpy and python's random")
    deterministic: bool = Field(True, description="torch.use_deterministic_algorithms(True)")
    threads: int = Field(1, ge=0, description="torch CPU threads, set by the launcher for the run "
                         "(0: torch's default; 1 is fastest for tiny models on a busy machine)")


RunFn = Callable[[Any, Any], Any]
#: An experiment's ``--quick`` preset: config overrides, or a function of the config resolved
#: without the preset that returns them (see :func:`resolve_config`).
QuickPreset = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its name, Config class, run function and one-line help, and
    its optional hooks: ``quick`` (the :data:`QuickPreset` that ``--quick`` applies),
    ``summary_rows(records) -> rows`` (its own results table, rebuilt by ``flatlab compare``
    from a run folder's metrics), ``joined_rows(records) -> rows`` (a table over the
    measurements of several runs joined, e.g. paired verdicts of a study split per task) and
    ``sweep_defaults(cfg) -> dict`` (``flatlab sweep``'s default grid, search space, seed key,
    fixed and list-valued keys)."""

    name: str
    config_cls: type[BaseModel]
    run: RunFn
    help: str
    module: str
    summary_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
    sweep_defaults: Callable[[Any], dict[str, Any]] | None = None
    quick: QuickPreset | None = None
    joined_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None


_REGISTRY: dict[str, Experiment] = {}
_BROKEN: dict[str, str] = {}
_DISCOVERED = False


def register(
    name: str, config_cls: type[BaseModel], help: str = "", *,
    quick: QuickPreset | None = None,
    summary_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
    joined_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
    sweep_defaults: Callable[[Any], dict[str, Any]] | None = None,
) -> Callable[[RunFn], RunFn]:
    """Decorator registering ``run(cfg, run)`` as experiment ``name`` with config ``config_cls``
    and the optional hooks of :class:`Experiment` (``quick``, ``summary_rows``,
    ``joined_rows``, ``sweep_defaults``).

    Raises:
        TypeError: if ``config_cls`` is not a pydantic model with a ``quick`` field, or
            ``quick`` is neither a mapping nor callable.
        ValueError: if ``name`` is already taken by another module, or a key of a mapping
            ``quick`` preset is not a field of ``config_cls``.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, BaseModel)):
        raise TypeError(f"config_cls must be a pydantic BaseModel subclass, got {config_cls!r}")
    if "quick" not in config_cls.model_fields:
        raise TypeError(f"config_cls must have a 'quick: bool' field, got {config_cls.__name__}")
    if quick is not None and not (isinstance(quick, Mapping) or callable(quick)):
        raise TypeError(f"quick must be a mapping or a function of the config, got {quick!r}")
    if isinstance(quick, Mapping):
        unknown = sorted(set(quick) - set(config_cls.model_fields))
        if unknown:
            raise ValueError(f"quick preset keys must be fields of {config_cls.__name__}, "
                             f"got {unknown}")

    def decorator(fn: RunFn) -> RunFn:
        old = _REGISTRY.get(name)
        if old is not None and old.module != fn.__module__:
            raise ValueError(
                f"experiment name must be unique, got {name!r} again in {fn.__module__}"
            )
        doc = help or (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Experiment(name, config_cls, fn, doc, fn.__module__,
                                     summary_rows=summary_rows, sweep_defaults=sweep_defaults,
                                     quick=quick, joined_rows=joined_rows)
        return fn

    return decorator


def discover() -> None:
    """Import every public module of :mod:`flatlab.experiments` once (idempotent)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module("flatlab.experiments")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"flatlab.experiments.{info.name}")
        except Exception as exc:  # noqa: BLE001 - a broken module must not hide the others
            _BROKEN[info.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    _DISCOVERED = True


def names() -> list[str]:
    """Sorted names of the registered experiments."""
    discover()
    return sorted(_REGISTRY)


def broken() -> dict[str, str]:
    """Experiment modules that failed to import, with a one-line reason each."""
    discover()
    return dict(_BROKEN)


def get(name: str) -> Experiment:
    """Return the experiment registered as ``name``, or raise :class:`ConfigError`."""
    discover()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BROKEN:
        raise ConfigError(f"experiment {name!r} failed to import: {_BROKEN[name]}")
    known = ", ".join(sorted(_REGISTRY)) or "none"
    raise ConfigError(f"unknown experiment {name!r} (known: {known})")


# ---------------------------------------------------------------------------------- configs
def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml``/``.toml``/``.json`` config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file does not exist: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(path.read_text())
        else:
            raise ConfigError(f"config file must end in .yaml, .yml, .toml or .json, got {path}")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    """``--set`` values stay strings (pydantic coerces them) except null and YAML collections."""
    stripped = text.strip()
    if stripped.lower() in ("null", "none", "~"):
        return None
    if stripped[:1] in ("[", "{"):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set value {text!r} is not valid YAML") from exc
    return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into the nested dict ``{"a": {"b": "1"}, "c": "x"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set must look like key=value, got {item!r}")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set key {key!r} conflicts with an earlier --set")
        node[parts[-1]] = _parse_value(value)
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _check_keys(model: type[BaseModel], data: Mapping[str, Any], prefix: str, exp: str) -> None:
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            known = ", ".join(model.model_fields)
            raise ConfigError(
                f"unknown config key {prefix + key!r} for experiment {exp!r} (known: {known})"
            )
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, Mapping):
            _check_keys(sub, value, f"{prefix}{key}.", exp)


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not loc:  # a check across fields: its message names the values
        return f"config: {msg}"
    return f"config {loc}: {msg}, got {err.get('input')!r}"


def resolve_config(
    name: str,
    *,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
) -> BaseModel:
    """Build the validated Config of experiment ``name`` from a file, ``--quick`` and ``--set``.

    The layers are those of the module docstring. When the result has ``quick=True`` (from
    ``quick``, the file or ``--set quick=true``), the experiment's quick preset is layered
    between the file and ``--set``. A preset function is handed the config resolved without
    it (every layer), so it can shrink what the file or ``--set`` asked for (``min(cfg.steps,
    80)``) and derive sizes from them; the keys given with ``--set`` are then applied again
    on top, so an explicit ``--set`` always wins.

    Raises:
        ConfigError: unknown experiment, unknown key, wrong type or value out of range.
    """
    exp = get(name)
    base: dict[str, Any] = {}
    if config_file is not None:
        base = load_config_file(config_file)
    if quick:
        base["quick"] = True
    sets = parse_overrides(overrides)
    cfg = _validate(exp, _merge(base, sets))
    if cfg.quick and exp.quick is not None:
        preset = exp.quick
        if callable(preset):
            preset = preset(cfg)
        cfg = _validate(exp, _merge(_merge(base, dict(preset)), sets))
    return cfg


def _validate(exp: Experiment, data: dict[str, Any]) -> BaseModel:
    _check_keys(exp.config_cls, data, "", exp.name)
    try:
        cfg = exp.config_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    check_finite(cfg)
    return cfg


def check_finite(cfg: BaseModel) -> None:
    """Raise :class:`ConfigError` naming the first NaN or infinite number anywhere in ``cfg``.

    No experiment setting means anything at ``inf`` or ``nan`` (``lr=inf`` would "run" and
    diverge), so every float, in nested settings and lists too, must be finite.
    """

    def walk(value: Any, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config {key}: must be a finite number, got {value}")
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")

    walk(cfg.model_dump(), "")


def is_factory_field(field: Any) -> bool:
    """A string setting naming a user's ``module:function`` (its description starts so)."""
    return (field.description or "").startswith("module:function")


def check_factories(cfg: BaseModel) -> None:
    """Import every ``module:function`` setting of ``cfg`` and, for a data factory, call it.

    Run before the run folder is made, so a missing module or a factory that returns the wrong
    thing stops the run with one line and leaves nothing behind. A data factory (a factory
    setting named ``data``) must return a :class:`flatlab.data.Splits` or an object with the
    same attributes; its result is kept and handed to the experiment's own
    :func:`load_factory` call, so the data is built once.
    """
    _PRELOADED.clear()
    for key, field in type(cfg).model_fields.items():
        spec = getattr(cfg, key)
        if not (is_factory_field(field) and isinstance(spec, str) and spec):
            continue
        fn = load_factory(spec, key)
        if key == "data":
            out = fn()
            missing = [a for a in _SPLITS_ATTRS if not hasattr(out, a)]
            if missing:
                raise ConfigError(
                    f"data factory {spec!r} must return flatlab.data.Splits (train, val, test, "
                    f"num_classes, input_shape), got {type(out).__name__} without "
                    f"{', '.join(missing)}")
            _PRELOADED[spec] = out


_SPLITS_ATTRS = ("train", "val", "test", "num_classes", "input_shape")
#: data factory results computed by :func:`check_factories`, by spec (one launch at a time)
_PRELOADED: dict[str, Any] = {}


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` for every field, nested models flattened."""
    rows: list[tuple[str, str, str, str]] = []
    for key, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{key}."))
            continue
        type_name = _type_name(ann)
        if field.metadata:  # constraints such as gt=0 are part of the type a user must meet
            type_name += " (" + ", ".join(_constraint(m) for m in field.metadata) + ")"
        default = field.get_default(call_default_factory=True)
        rows.append((prefix + key, type_name, repr(default), field.description or ""))
    return rows


def _type_name(ann: Any) -> str:
    """A short readable type: ``int``, ``list[sgd|sam]``, ``Path | None``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | None" if type(None) in args else "")
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _constraint(meta: Any) -> str:
    """``> 0``, ``len >= 1``, ``one of float32|float64``: a field constraint in words."""
    described = getattr(getattr(meta, "func", None), "constraint", None)
    if described:  # a validator of this module that says what it checks
        return described
    for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if getattr(meta, attr, None) is not None:
            return f"{sym} {getattr(meta, attr)}"
    for attr, sym in (("min_length", "len >="), ("max_length", "len <=")):
        if getattr(meta, attr, None) is not None:
            return f"{sym} {getattr(meta, attr)}"
    pattern = getattr(meta, "pattern", None)
    if pattern:
        alternatives = str(pattern).removeprefix("^(").removesuffix(")$")
        if all(c.isalnum() or c in "_|-." for c in alternatives):
            return "one of " + alternatives
        return f"matching {pattern}"
    return str(meta).replace("_Pydantic", "")


def load_factory(spec: str, what: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (a user's model or data factory) and return it.

    Args:
        spec: the dotted module path and the attribute, separated by ``:``.
        what: the setting's name, used in error messages (e.g. ``"model"``).

    Raises:
        ConfigError: the spec is malformed, the module cannot be imported, or the attribute is
            missing or not callable.
    """
    if spec in _PRELOADED:  # already called (and checked) by check_factories
        out = _PRELOADED.pop(spec)
        return lambda: out
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{what}: {module_name!r} has no callable {attr!r}")
    return fn
