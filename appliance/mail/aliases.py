"""Aliases in ``/etc/aliases`` syntax (aliases(5)), without the program and file holes (M-4).

Syntax::

    # comment
    name: target, target, ...
        continued target, ...          (a line starting with white space continues)
    sales@example.test: bob, "carol"@example.test
    staff: :include:staff.list         (relative to the aliases file's directory)

Keys are lower-cased; a key with ``@`` applies to that address only, a bare key
applies to the primary domains (the recipient lookup decides which; see
appliance.mail.local).  Targets are addresses, bare local parts (qualified
with the domain of the address being expanded) or ``:include:`` files holding
more targets (one or more per line, comments allowed; includes may nest, a
cycle is an error).  ``|program`` and ``/file`` targets are refused at load
time, as is anything else that is not an address: an appliance never runs
programs or writes files for mail from the network.  Every error is reported,
each naming the file, the line and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MAX_INCLUDE_DEPTH = 10

_LOCAL_RE = re.compile(r'\A(?:[A-Za-z0-9!#$%&\'*+/=?^_`{|}~.-]+|"(?:[^"\\\r\n]|\\.)*")\Z')
_DOMAIN_RE = re.compile(
    r"\A(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?\Z"
)
_KEY_RE = re.compile(r"\A[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(?:@[A-Za-z0-9.-]+)?\Z")


class AliasError(Exception):
    """The aliases file has errors; ``errors`` lists every one as ``file:line: reason``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class AliasTable:
    """Alias keys (``local`` or ``local@domain``, lower case) to their target addresses."""

    entries: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def lookup(self, address: str, bare: bool) -> tuple[str, ...] | None:
        """The targets for ``address`` (``local@domain``), or None when it is no alias.

        The key ``local@domain`` wins; the bare key ``local`` is used only when
        ``bare`` (the domain is a primary domain).  Bare targets are qualified
        with the address's domain.
        """
        address = address.lower()
        local, _, domain = address.rpartition("@")
        targets = self.entries.get(address)
        if targets is None and bare:
            targets = self.entries.get(local)
        if targets is None:
            return None
        return tuple(t if "@" in t else f"{t}@{domain}" for t in targets)

    def __len__(self) -> int:
        """The number of alias names."""
        return len(self.entries)


def _split_targets(text: str) -> list[str]:
    """Split on commas outside double quotes; strip white space."""
    out, cur, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            escaped = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _unquote_whole(target: str) -> str:
    if len(target) >= 2 and target[0] == '"' and target[-1] == '"' and '"' not in target[1:-1]:
        return target[1:-1].strip()
    return target


def _check_address(target: str) -> str | None:
    """None when ``target`` is an acceptable address, else the reason it is not."""
    local, at, domain = target.rpartition("@")
    if not at:
        local, domain = target, ""
    if not local:
        return f"empty local part in {target!r}"
    if not _LOCAL_RE.match(local):
        return f"{target!r} is not an address"
    if at and not _DOMAIN_RE.match(domain):
        return f"bad domain in {target!r}"
    return None


def _normalise(target: str) -> str:
    local, at, domain = target.rpartition("@")
    if not at:
        return target.lower()
    return f"{local.lower()}@{domain.lower().rstrip('.')}"


ReadFile = Callable[[Path], str]


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _targets(
    raw: str,
    where: str,
    base: Path,
    errors: list[str],
    read: ReadFile,
    including: tuple[Path, ...],
) -> list[str]:
    out = []
    for item in _split_targets(raw):
        if not item:
            errors.append(f"{where}: empty target")
            continue
        target = _unquote_whole(item)
        if target[:9].lower() == ":include:":
            out.extend(_include(target[9:].strip(), where, base, errors, read, including))
            continue
        if target.startswith("|"):
            errors.append(f"{where}: program target {target!r} refused (no program delivery)")
            continue
        if target.startswith("/") or target.startswith("~") or target.startswith("."):
            errors.append(f"{where}: file target {target!r} refused (no file delivery)")
            continue
        reason = _check_address(target)
        if reason is not None:
            errors.append(f"{where}: {reason}")
            continue
        out.append(_normalise(target))
    return out


def _include(
    name: str,
    where: str,
    base: Path,
    errors: list[str],
    read: ReadFile,
    including: tuple[Path, ...],
) -> list[str]:
    if not name:
        errors.append(f"{where}: :include: without a file name")
        return []
    path = (base / name).resolve() if not Path(name).is_absolute() else Path(name)
    if path in including:
        errors.append(f"{where}: :include: loop through {path}")
        return []
    if len(including) >= MAX_INCLUDE_DEPTH:
        errors.append(f"{where}: :include: nested too deeply at {path}")
        return []
    try:
        text = read(path)
    except (OSError, UnicodeDecodeError) as e:
        errors.append(f"{where}: cannot read include file {path}: {e}")
        return []
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        out.extend(
            _targets(stripped, f"{path}:{lineno}", path.parent, errors, read, (*including, path))
        )
    return out


def parse_aliases(
    text: str, source: Path | str = "<aliases>", read: ReadFile = _read_text
) -> tuple[AliasTable, list[str]]:
    """Parse aliases text; returns the table of the good entries and every error found."""
    source_path = Path(source)
    base = source_path.parent
    errors: list[str] = []
    logical: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                errors.append(f"{source}:{lineno}: continuation line without an alias")
                continue
            start, previous = logical[-1]
            logical[-1] = (start, previous + " " + line.strip())
        else:
            logical.append((lineno, line.strip()))
    entries: dict[str, tuple[str, ...]] = {}
    first_seen: dict[str, int] = {}
    for lineno, line in logical:
        where = f"{source}:{lineno}"
        name, colon, rest = line.partition(":")
        name = _unquote_whole(name.strip()).lower()
        if not colon:
            errors.append(f"{where}: expected 'name: target, ...'")
            continue
        if not name or not _KEY_RE.match(name):
            errors.append(f"{where}: bad alias name {name!r}")
            continue
        if name in first_seen:
            errors.append(f"{where}: alias {name!r} already defined on line {first_seen[name]}")
            continue
        before = len(errors)
        targets = _targets(rest, where, base, errors, read, (source_path.resolve(),))
        if not targets and len(errors) == before:
            errors.append(f"{where}: alias {name!r} has no targets")
        first_seen[name] = lineno
        if targets:
            entries[name] = tuple(dict.fromkeys(targets))
    return AliasTable(entries), errors


def load_aliases(path: Path) -> AliasTable:
    """Load an aliases file; raises AliasError listing every error (file, line, reason)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AliasError([f"{path}: cannot read: {e}"]) from e
    table, errors = parse_aliases(text, path)
    if errors:
        raise AliasError(errors)
    return table
