"""Typed run configuration and the one way every command line is built from it.

A job's settings are a frozen dataclass whose fields are plain values (``int``, ``float``,
``str``, ``Path``, ``bool``, ``Literal[...]`` choices, ``X | None``, ``tuple[int, ...]``) or
nested dataclasses of the same kind (sections, shown as argument groups in ``--help``). Each
field's default and help text are written once, in the dataclass, with :func:`option`; the
dataclass validates itself in ``__post_init__`` and raises :class:`ConfigError`.

:func:`build_parser` turns such a dataclass into an :mod:`argparse` parser with one flag per
leaf field (``--field-name``; section names do not appear in flags) plus ``--config FILE``.
:func:`parse_config` reads the command line: values come from the dataclass defaults, then from
``--config FILE`` (a JSON file such as a run's ``config.json``, written by :func:`to_dict`), then
from the flags actually given, so a saved run repeats exactly and any flag overrides the file.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Sequence, TypeVar


class _Dataclass(Protocol):
    """What :func:`dataclasses.fields` takes: a dataclass."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


C = TypeVar("C", bound=_Dataclass)  # a config dataclass

CONFIG_FLAG = "config"


class ConfigError(Exception):
    """A setting that is missing, of the wrong type or out of range; the message names it."""


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | tuple[str, ...] | None = None,
           metavar: str | None = None, positional: bool = False) -> Any:
    """A config field: its default, its ``--help`` text and, rarely, flags other than
    ``--field-name`` (a published spelling, or a short form: ``flag=("-g", "--groundtruth")``)."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "positional": positional}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, *, help: str) -> Any:
    """A nested config dataclass, built from its own defaults; ``help`` titles its argument group."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


# -- reading a field's type ------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` (from JSON or argparse) as a value of type ``tp``; :class:`ConfigError` if it is not one."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must be set (got null)")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        item = typing.get_args(inner)[0]
        if item in (str, Path) and isinstance(value, str):
            value = [value]  # a field that became a list (infer's --checkpoint) reads its old config files
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, name) for v in value)
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if inner in (str, Path):
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return inner(value)
    raise TypeError(f"{name}: unsupported config field type {tp!r}")  # a programming error


# -- dict <-> dataclass ------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """The config as JSON-ready nested dicts (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(config)


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build ``cls`` from nested dicts; an unknown key, a wrong type or a failed validation is a
    :class:`ConfigError` naming the key (``where`` prefixes it, e.g. the file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object of settings, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    values = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}"
        values[name] = from_dict(tp, value, key) if _is_section(tp) else _coerce(value, tp, key)
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing setting {missing[0]!r}")
    return cls(**values)


def flat_dict(config: Any) -> dict[str, Any]:
    """``{leaf field name: value}`` of a config (names are unique across its sections)."""
    return {path[-1]: value for path, value in _leaf_values(to_dict(config), type(config))}


def from_flat(cls: type[C], **values: Any) -> C:
    """``cls`` from leaf field names, as on the command line (``from_flat(TrainConfig, lr=1e-3, ...)``)."""
    return from_dict(cls, _nest(cls, _known(cls, values)), cls.__name__)


def replace_flat(config: C, **values: Any) -> C:
    """A copy of ``config`` with some leaf fields changed, named as on the command line."""
    cls = type(config)
    return from_dict(cls, _merge(to_dict(config), _nest(cls, _known(cls, values))), cls.__name__)


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for _, f, _ in _leaves(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {unknown[0]!r}")  # a programming error
    return values


def _leaf_values(data: dict[str, Any], cls: type) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for leaf_path, _, _ in _leaves(cls):
        node: Any = data
        for part in leaf_path:
            node = node[part]
        out.append((leaf_path, node))
    return out


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load_json(cls: type[C], path: str | Path) -> C:
    """Read a config file written by :func:`save_json`; a bad file is a :class:`ConfigError` naming it."""
    return from_dict(cls, _read_json(Path(path)), str(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as err:  # ENOTDIR, ELOOP, ENAMETOOLONG, EACCES: the OS's verdict on the path
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: cannot read config file: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON (line {err.lineno}: {err.msg})") from None


# -- the command line --------------------------------------------------------------------------


def _leaves(cls: type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, type) of every non-section field, depth first, in declaration order."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            out.extend(_leaves(hints[f.name], path + (f.name,)))
        else:
            out.append((path + (f.name,), f, hints[f.name]))
    return out


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return (flag,) if isinstance(flag, str) else tuple(flag)


def _flag(f: dataclasses.Field) -> str:
    """The field's long flag (the one messages name), or a positional argument's name."""
    if f.metadata.get("positional"):
        return f.name.upper()
    return next((flag for flag in _flags(f) if flag.startswith("--")), _flags(f)[0])


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING:
        return "required"
    if f.default is None:
        return "none"
    if isinstance(f.default, tuple):
        return " ".join(map(str, f.default))
    return str(f.default)


def _help_text(f: dataclasses.Field) -> str:
    """The field's help, with its default unless the help already says what it is."""
    text = f.metadata.get("help", "")
    return text if "(default" in text else f"{text} (default: {_default_text(f)})"


def _add_argument(group: Any, f: dataclasses.Field, tp: Any) -> None:
    inner, _ = _strip_optional(tp)
    kwargs: dict[str, Any] = {
        "dest": f.name,
        "default": argparse.SUPPRESS,  # only flags actually given reach the namespace
        "help": _help_text(f),
    }
    if f.metadata.get("metavar"):
        kwargs["metavar"] = f.metadata["metavar"]
    origin = typing.get_origin(inner)
    if inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        choices = typing.get_args(inner)
        kwargs.update(choices=choices, type=type(choices[0]))
        kwargs.setdefault("metavar", "{" + ",".join(map(str, choices)) + "}")
    elif origin is tuple:
        kwargs.update(nargs="+", type=typing.get_args(inner)[0])
    else:
        kwargs["type"] = inner
    if f.metadata.get("positional"):  # a required positional argument, named by its field
        kwargs.pop("dest")
        kwargs.update(default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
        group.add_argument(f.name, **kwargs)
        return
    group.add_argument(*_flags(f), **kwargs)


def build_parser(cls: type, *, prog: str | None = None, description: str | None = None,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """One flag per leaf field of ``cls`` (argument groups per section) and ``--config FILE``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", dest=CONFIG_FLAG, metavar="FILE", default=None,
                        help="start from the settings in this JSON file (e.g. a run's config.json); "
                             "flags given on the command line override its values")
    names: set[str] = set()

    def add(section_cls: type, group: Any) -> None:
        hints = _hints(section_cls)
        for f in dataclasses.fields(section_cls):
            if _is_section(hints[f.name]):
                add(hints[f.name], parser.add_argument_group(f.metadata.get("help", f.name)))
                continue
            if f.name in names:
                raise TypeError(f"config field {f.name!r} appears in two sections")  # programming error
            names.add(f.name)
            _add_argument(group, f, hints[f.name])

    add(cls, parser)
    return parser


def to_argv(config: Any) -> list[str]:
    """The command line that :func:`parse_config` turns back into ``config`` (settings left at
    ``None`` are omitted, booleans become ``--flag`` / ``--no-flag``)."""
    argv: list[str] = []
    values = dict(_leaf_values(to_dict(config), type(config)))
    for path, f, _ in _leaves(type(config)):
        value = values[path]
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(_flag(f) if value else "--no-" + _flag(f)[2:])
        elif isinstance(value, list):
            argv += [_flag(f), *map(str, value)]
        else:
            argv += [_flag(f), repr(value) if isinstance(value, float) else str(value)]
    return argv


def _nest(cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{field_name: value}`` (argparse dests) -> nested dicts shaped like ``cls``."""
    nested: dict[str, Any] = {}
    for path, f, _ in _leaves(cls):
        if f.name in flat:
            node = nested
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = flat[f.name]
    return nested


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_config(cls: type[C], argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> C:
    """The config of a command line (defaults < ``--config FILE`` < flags given). A bad value,
    file or combination exits like argparse does: one line on stderr, exit code 2."""
    parser = parser or build_parser(cls)
    namespace = vars(parser.parse_args(argv))
    file = namespace.pop(CONFIG_FLAG)
    flags = {name: list(v) if isinstance(v, tuple) else v for name, v in namespace.items()}
    try:
        try:
            base = _read_json(Path(file)) if file else {}
        except ConfigError as err:
            raise ConfigError(f"--{CONFIG_FLAG} {err}") from None
        where = file or "command line"
        if not isinstance(base, dict):
            raise ConfigError(f"{file}: expected an object of settings")
        data = _merge(base, _nest(cls, flags))
        _check_keys(cls, data, where)  # a misspelt key in the file is named before anything else
        required = [f for _, f, _ in _leaves(cls) if f.default is dataclasses.MISSING and f.name not in data]
        if required:
            names = ", ".join("/".join(_flags(f)) for f in required)
            raise ConfigError(f"the following arguments are required: {names}")
        try:
            return from_dict(cls, data, where)
        except ConfigError as err:
            raise ConfigError(_as_flag_message(cls, str(err))) from None
    except ConfigError as err:
        parser.error(str(err))
    raise AssertionError("unreachable")  # parser.error exits


def _check_keys(cls: type, data: Any, where: str) -> None:
    """Raise :class:`ConfigError` naming the first key of ``data`` that ``cls`` does not have."""
    if not isinstance(data, dict):
        return  # from_dict names the wrong type
    hints = _hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(hints))})")
        if _is_section(hints[key]):
            _check_keys(hints[key], value, f"{where}.{key}")


def _as_flag_message(cls: type, message: str) -> str:
    """Name the flag next to a dotted setting (``command line.optim.lr: ...`` -> ``--lr: ...``)."""
    for path, f, _ in _leaves(cls):
        dotted = "command line." + ".".join(path) + ":"
        if message.startswith(dotted):
            return _flag(f) + ":" + message[len(dotted):]
    return message


# -- sections shared by the jobs -----------------------------------------------------------------

AmpMode = Literal["auto", "bf16", "fp16", "off"]
DEFAULT_DIST_TIMEOUT_MINUTES = 60.0


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a distributed job runs: device, precision, loader workers, threads."""

    device: str = option("auto", help="auto (cuda when available), cpu, cuda")
    amp: AmpMode = option("auto", help="autocast: bf16, fp16 (with a GradScaler when training) or off; auto = bf16 "
                                       "on GPUs that support it, off on CPU")
    workers: int | None = option(None, help="DataLoader worker processes per rank (default: auto = the rank's share "
                                            "of its CPU affinity cores, split by LOCAL_WORLD_SIZE, less one for the "
                                            "rank, between 0 and 4)")
    threads: int = option(0, help="intra-op CPU threads per rank (0: OMP_NUM_THREADS if set, else the rank's share "
                                  "of the cores less one per loader worker)")
    deterministic: bool = option(False, help="deterministic kernels (torch.use_deterministic_algorithms, "
                                             "CUBLAS_WORKSPACE_CONFIG=:4096:8, no cuDNN autotuning): on one GPU "
                                             "model and software stack, runs and resumes repeat bit for bit; an "
                                             "op without a deterministic kernel stops the run")
    compile: bool = option(False, help="torch.compile the model (CUDA graphs on GPUs) and, in training, bucket "
                                       "batch shapes so that a run compiles a handful of graphs")
    dist_timeout: float = option(DEFAULT_DIST_TIMEOUT_MINUTES,
                                 help="minutes a collective waits for the slowest rank (rank 0's validation, a "
                                      "first --memmap-dir build) before the job fails")

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout must be > 0 minutes, got {self.dist_timeout}")
