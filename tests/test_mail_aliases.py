"""The aliases(5) parser: syntax, includes, refused program/file targets, error reporting."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.mail.aliases import AliasError, AliasTable, load_aliases, parse_aliases

GOOD = """\
# the usual
postmaster: alice
abuse:      postmaster
Staff: alice, bob,
   carol@other.test
\t, "dave"@Example.TEST
sales@virtual.test: erin
quoted: "frank@example.test", george
"""


def test_parse_good_file() -> None:
    table, errors = parse_aliases(GOOD, "/etc/aliases")
    assert errors == []
    assert table.entries == {
        "postmaster": ("alice",),
        "abuse": ("postmaster",),
        "staff": ("alice", "bob", "carol@other.test", '"dave"@example.test'),
        "sales@virtual.test": ("erin",),
        "quoted": ("frank@example.test", "george"),
    }
    assert len(table) == 5


def test_lookup_qualifies_and_scopes_bare_keys() -> None:
    table, _ = parse_aliases(GOOD)
    assert table.lookup("Staff@Example.test", bare=True) == (
        "alice@example.test",
        "bob@example.test",
        "carol@other.test",
        '"dave"@example.test',
    )
    assert table.lookup("staff@virtual.test", bare=False) is None
    assert table.lookup("sales@virtual.test", bare=False) == ("erin@virtual.test",)
    assert table.lookup("sales@example.test", bare=True) is None
    assert AliasTable().lookup("x@y", bare=True) is None


def test_program_and_file_targets_refused_with_location() -> None:
    text = 'ok: alice\nbad: alice, |/usr/bin/prog\nworse: "|/bin/sh -c x"\nfile: /var/mail/x\n'
    table, errors = parse_aliases(text, "/etc/aliases")
    assert len(errors) == 3
    assert errors[0].startswith("/etc/aliases:2: program target")
    assert errors[1].startswith("/etc/aliases:3: program target")
    assert errors[2].startswith("/etc/aliases:4: file target")
    assert "refused" in errors[2]
    # the good parts of the file are still understood, the bad target dropped
    assert table.entries["bad"] == ("alice",)


def test_load_reports_all_errors(tmp_path: Path) -> None:
    p = tmp_path / "aliases"
    p.write_text("a: |prog\n  \nnocolon\nb: /tmp/x\nc: bad address\n: x\n c2: x\n")
    with pytest.raises(AliasError) as exc:
        load_aliases(p)
    errors = exc.value.errors
    assert len(errors) == 5, errors
    assert all(e.startswith(f"{p}:") for e in errors)
    assert f"{p}:3: expected" in errors[1]


def test_continuation_without_alias_and_duplicates() -> None:
    _, errors = parse_aliases("  stray\na: b\nA: c\n", "f")
    assert errors[0] == "f:1: continuation line without an alias"
    assert errors[1].startswith("f:3: alias 'a' already defined on line 2")


def test_include_relative_to_aliases_file(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "staff").write_text("# staff\nalice, bob\n\ncarol@other.test\n")
    (tmp_path / "aliases").write_text("staff: :include:lists/staff, dave\n")
    table = load_aliases(tmp_path / "aliases")
    assert table.entries["staff"] == ("alice", "bob", "carol@other.test", "dave")


def test_include_errors(tmp_path: Path) -> None:
    (tmp_path / "a.list").write_text("x\n:include:b.list\n")
    (tmp_path / "b.list").write_text(":include:a.list\n|evil\n")
    (tmp_path / "aliases").write_text(
        "l: :include:a.list\nm: :include:missing.list\nn: :include:\n"
    )
    with pytest.raises(AliasError) as exc:
        load_aliases(tmp_path / "aliases")
    errors = exc.value.errors
    joined = "\n".join(errors)
    assert "loop" in joined
    assert f"{tmp_path / 'b.list'}:2: program target" in joined
    assert "cannot read include file" in joined and "aliases:2" in joined
    assert "aliases:3: :include: without a file name" in joined


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(AliasError) as exc:
        load_aliases(tmp_path / "nope")
    assert "cannot read" in exc.value.errors[0]


@given(st.text(max_size=300))
def test_parser_never_crashes(text: str) -> None:
    table, _errors = parse_aliases(text)
    for targets in table.entries.values():
        assert targets
        assert not any(t.startswith(("|", "/")) for t in targets)
