"""A small strict reader for TOML tables: typed getters that collect every error and refuse unknown keys.

Configuration checking is modelled on Buildbot (report every error at once)
and Tahoe-LAFS (a key nobody declared is a typo, hence an error).  Each
getter records a problem as ``(key path, reason)`` and returns a harmless
placeholder so that checking can go on and find the next problem.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import ipaddress
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING: Any = object()


@dataclass(frozen=True)
class Problem:
    """One configuration error: which file, which key, what is wrong."""

    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


@dataclass
class Problems:
    """Every problem found so far in one file."""

    file: str
    items: list[Problem] = field(default_factory=list)

    def add(self, key: str, reason: str) -> None:
        self.items.append(Problem(self.file, key or "(top level)", reason))


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float:
    """``300``, ``"90s"``, ``"15m"``, ``"4h"``, ``"5d"``, ``"1w"`` -> seconds; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'must be a duration such as 300, "15m", "4h" or "5d", not {value!r}')
    if isinstance(value, str):
        text = value.strip().lower()
        unit = _UNITS.get(text[-1:]) if text else None
        try:
            seconds = float(text[:-1]) * unit if unit else float(text)
        except ValueError:
            raise ValueError(
                f'must be a duration such as "15m", "4h" or "5d", not {value!r}'
            ) from None
    else:
        seconds = float(value)
    if not 0 <= seconds <= 10 * 365 * 86400:
        raise ValueError(f"must be between 0 and 10 years, not {value!r}")
    return seconds


class Table:
    """One TOML table being read; ``done()`` reports the keys nobody asked for."""

    def __init__(self, data: dict[str, Any], prefix: str, problems: Problems, base: Path) -> None:
        self._data = data
        self._prefix = prefix
        self._problems = problems
        self._base = base
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def error(self, name: str, reason: str) -> None:
        self._problems.add(self.key(name), reason)

    def has(self, name: str) -> bool:
        return name in self._data

    def _raw(self, name: str, kind: type, default: Any) -> Any:
        self._seen.add(name)
        if name not in self._data:
            if default is _MISSING:
                self.error(name, "is required")
            return default
        value = self._data[name]
        # bool is an int in Python; an integer setting must not take true/false.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.error(name, f"must be {_TYPE_NAMES[kind]}, not {type(value).__name__}")
            return _MISSING
        return value

    def string(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> str:
        value = self._raw(name, str, default)
        if value is _MISSING:
            return "" if default is _MISSING else default
        if choices and value not in choices:
            self.error(name, f"must be one of {', '.join(choices)}, not {value!r}")
            return choices[0]
        return value  # type: ignore[no-any-return]

    def integer(self, name: str, default: Any = _MISSING, low: int = 0, high: int = 2**31) -> int:
        value = self._raw(name, int, default)
        if value is _MISSING:
            return 0 if default is _MISSING else default  # type: ignore[no-any-return]
        if not low <= value <= high:
            self.error(name, f"must be between {low} and {high}, not {value}")
            return low
        return value  # type: ignore[no-any-return]

    def duration(self, name: str, default: Any = _MISSING) -> float:
        """Seconds, written as a number of seconds or as ``90s``, ``15m``, ``4h``, ``5d``, ``1w``."""
        self._seen.add(name)
        value = self._data.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                self.error(name, "is required")
                return 0.0
            value = default
        try:
            return parse_duration(value)
        except ValueError as e:
            self.error(name, str(e))
            return 0.0

    def port(self, name: str, default: Any = _MISSING) -> int:
        return self.integer(name, default, 1, 65535)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self._raw(name, bool, default)
        if value is _MISSING:
            return False if default is _MISSING else default  # type: ignore[no-any-return]
        return value  # type: ignore[no-any-return]

    def strings(self, name: str, default: Any = _MISSING) -> tuple[str, ...]:
        value = self._raw(name, list, default)
        if value is _MISSING:
            return () if default is _MISSING else tuple(default)
        out = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.error(f"{name}[{index}]", f"must be a string, not {type(item).__name__}")
            else:
                out.append(item)
        return tuple(out)

    def each(
        self, name: str, default: Any, convert: Callable[[str], T], what: str
    ) -> tuple[T, ...]:
        """A list of strings, each converted; a bad element is reported with its index."""
        out: list[T] = []
        items = self.strings(name, default)
        for index, item in enumerate(items):
            try:
                out.append(convert(item))
            except ValueError as e:
                self.error(f"{name}[{index}]", f"{item!r} is not {what} ({e})")
        return tuple(out)

    def addresses(self, name: str, default: Any = _MISSING) -> tuple[str, ...]:
        return self.each(name, default, lambda s: str(ipaddress.ip_address(s)), "an IP address")

    def networks(
        self, name: str, default: Any = _MISSING
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return self.each(name, default, ipaddress.ip_network, "a network in CIDR form")

    def path(self, name: str, default: Any = _MISSING, must_exist: bool = False) -> Path:
        """A path; relative paths are taken from the config file's directory."""
        value = self.string(name, default)
        if not value:
            return Path()
        resolved = (self._base / value) if not Path(value).is_absolute() else Path(value)
        if must_exist and not resolved.exists():
            self.error(name, f"{resolved} does not exist")
        return resolved

    def table(self, name: str, required: bool = False) -> Table:
        self._seen.add(name)
        value = self._data.get(name, _MISSING)
        if value is _MISSING:
            if required:
                self.error(name, "is required")
            value = {}
        elif not isinstance(value, dict):
            self.error(name, f"must be a table, not {type(value).__name__}")
            value = {}
        return Table(value, self.key(name), self._problems, self._base)

    def tables(self, name: str) -> list[Table]:
        """An array of tables (``[[name]]``)."""
        self._seen.add(name)
        value = self._data.get(name, [])
        if not isinstance(value, list):
            self.error(name, "must be an array of tables")
            return []
        out = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                self.error(f"{name}[{index}]", "must be a table")
                continue
            out.append(Table(item, f"{self.key(name)}[{index}]", self._problems, self._base))
        return out

    def keys(self) -> list[str]:
        """The keys present in this table, in file order."""
        return list(self._data)

    def subtables(self) -> list[tuple[str, Table]]:
        """Every key of this table read as a named subtable (``[views.NAME]`` style)."""
        return [(name, self.table(name)) for name in list(self._data)]

    def done(self) -> None:
        for name in self._data:
            if name not in self._seen:
                self.error(name, "unknown setting")


def read_dataclass(table: Table, cls: type[T], *, path_fields: tuple[str, ...] = ("path",)) -> T:
    """Build the settings dataclass ``cls`` from ``table``: one key per field, field defaults apply.

    Supported field types: str, int, float (a number or a duration such as
    ``"5m"``), bool, ``str | None``, tuples of str, ``Mapping[str, float]``,
    nested settings dataclasses (a sub-table) and tuples of them (an array of
    tables).  Fields named in ``path_fields`` or ending in ``_file`` are paths
    resolved against the config file's directory.  Unknown keys are errors.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not table.has(f.name):
            table._seen.add(f.name)
            continue
        kind = hints[f.name]
        values[f.name] = _read_field(table, f.name, kind, f.name in path_fields or f.name.endswith("_file"))
    table.done()
    return cls(**values)


def _read_field(table: Table, name: str, kind: Any, is_path: bool) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        (kind,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return read_dataclass(table.table(name), kind)  # type: ignore[arg-type]
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        return tuple(read_dataclass(t, args[0]) for t in table.tables(name))  # type: ignore[arg-type]
    if origin is tuple:
        return table.strings(name)
    if origin in (Mapping, collections.abc.Mapping, dict):
        sub = table.table(name)
        return {key: sub.duration(key) for key in sub.keys()}
    if kind is bool:
        return table.boolean(name)
    if kind is int:
        return table.integer(name, low=-(2**31))
    if kind is float:
        return table.duration(name)
    if kind is str:
        if is_path:
            return str(table.path(name))
        return table.string(name)
    table.error(name, f"cannot be set in this file (type {kind})")
    return None
