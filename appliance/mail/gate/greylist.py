"""Greylisting (seed 004 check (6); the postgrey idea): refuse a new triple once, accept its retry.

The triple is (client /24 or /64, envelope sender, recipient).  The first
attempt gets 451 4.7.1; a retry after ``delay`` seconds (and within
``retry_window``) passes, and the triple is then remembered for
``remember`` seconds from its last use.  A client network whose triples
passed ``auto_allow_after`` times is let through at once.  State is an
sqlite3 file (stdlib; each change is one committed transaction) so it
survives restarts; the clock is injected.  Off by default (mail-anchors
section 3, item 9: one-time login links expire during the delay).
"""

from __future__ import annotations

import contextlib
import ipaddress
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from appliance.mail.gate.verdict import Verdict, accept, network_of, parse_ip, tempfail
from appliance.mail.interfaces import Reply

log = Logger(namespace="appliance.mail.gate.greylist")

GREYLIST_REPLY_TEXT = "Greylisted, please try again later"


@dataclass(frozen=True)
class GreylistSettings:
    """Greylisting settings; ``path`` is the sqlite3 file (None: in memory, lost at restart).

    ``allow_networks`` (CIDR), ``allow_senders`` (address or domain, matching
    subdomains) and ``allow_recipients`` (address or domain) are never
    greylisted.  ``auto_allow_after`` 0 turns auto-allow off.
    """

    enabled: bool = False
    path: str | None = None
    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    remember: float = 35 * 86400.0
    auto_allow_after: int = 5
    allow_networks: tuple[str, ...] = ()
    allow_senders: tuple[str, ...] = ()
    allow_recipients: tuple[str, ...] = ()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS triples (
    client TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed INTEGER NOT NULL,
    PRIMARY KEY (client, sender, recipient));
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_seen REAL NOT NULL);
"""


def _matches_domain(value: str, entries: tuple[str, ...]) -> bool:
    value = value.lower()
    domain = value.rpartition("@")[2]
    for entry in entries:
        entry = entry.lower().rstrip(".")
        if "@" in entry:
            if value == entry:
                return True
        elif domain == entry or domain.endswith("." + entry):
            return True
    return False


class Greylist:
    """The greylisting state; :meth:`check` judges one (client, sender, recipient)."""

    name = "greylist"

    def __init__(self, settings: GreylistSettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock: Any = clock
        self._allow_networks = tuple(
            ipaddress.ip_network(n, strict=False) for n in settings.allow_networks
        )
        self._db = sqlite3.connect(settings.path or ":memory:", isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._next_cleanup = 0.0

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic change (the connection is in autocommit mode otherwise)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database (the service's stopService)."""
        self._db.close()

    def _allowed(self, client_ip: str, sender: str, recipient: str) -> str | None:
        address = parse_ip(client_ip)
        if address is not None and any(
            address.version == net.version and address in net for net in self._allow_networks
        ):
            return "client in allow list"
        if sender and _matches_domain(sender, self.settings.allow_senders):
            return "sender in allow list"
        if _matches_domain(recipient, self.settings.allow_recipients):
            return "recipient in allow list"
        return None

    def check(self, client_ip: str, sender: str, recipient: str, dry_run: bool = False) -> Verdict:
        """Accept or 451 4.7.1; ``dry_run`` reports without recording (``appliance policy test``).

        A database error is logged and lets the mail through: greylisting is a
        filter, not a gate that may stop mail when its state is broken.
        """
        allowed = self._allowed(client_ip, sender, recipient)
        if allowed is not None:
            return accept(self.name, allowed)
        try:
            return self._check(network_of(client_ip), sender.lower(), recipient.lower(), dry_run)
        except sqlite3.Error as error:
            log.error("greylist database error, mail let through: {error}", error=str(error))
            return accept(self.name, f"database error: {error}")

    def _check(self, client: str, sender: str, recipient: str, dry_run: bool) -> Verdict:
        now = float(self.clock.seconds())
        settings = self.settings
        db = self._db
        if not dry_run and now >= self._next_cleanup:
            self._cleanup(now)
        if settings.auto_allow_after > 0:
            row = db.execute(
                "SELECT passes, last_seen FROM clients WHERE client = ?", (client,)
            ).fetchone()
            if (
                row is not None
                and row[0] >= settings.auto_allow_after
                and now - row[1] <= settings.remember
            ):
                if not dry_run:
                    db.execute("UPDATE clients SET last_seen = ? WHERE client = ?", (now, client))
                return accept(self.name, f"client {client} auto-allowed after {row[0]} passes")
        key = (client, sender, recipient)
        row = db.execute(
            "SELECT first_seen, last_seen, passed FROM triples WHERE client = ? AND sender = ? AND recipient = ?",
            key,
        ).fetchone()
        if row is not None:
            first_seen, last_seen, passed = row
            if passed and now - last_seen <= settings.remember:
                if not dry_run:
                    db.execute(
                        "UPDATE triples SET last_seen = ? WHERE client = ? AND sender = ? AND recipient = ?",
                        (now, *key),
                    )
                return accept(self.name, "known triple")
            if not passed and settings.delay <= now - first_seen <= settings.retry_window:
                if not dry_run:
                    with self._transaction():
                        db.execute(
                            "UPDATE triples SET last_seen = ?, passed = 1 WHERE client = ? AND sender = ? AND recipient = ?",
                            (now, *key),
                        )
                        db.execute(
                            "INSERT INTO clients (client, passes, last_seen) VALUES (?, 1, ?) "
                            "ON CONFLICT(client) DO UPDATE SET passes = passes + 1, last_seen = excluded.last_seen",
                            (client, now),
                        )
                return accept(self.name, f"retried after {now - first_seen:.0f}s")
            if not passed and now - first_seen < settings.delay:
                wait = settings.delay - (now - first_seen)
                return tempfail(
                    Reply(451, "4.7.1", GREYLIST_REPLY_TEXT),
                    self.name,
                    f"retried too early ({wait:.0f}s left)",
                )
        # New triple, or one whose memory or retry window ran out: start again.
        if not dry_run:
            db.execute(
                "INSERT OR REPLACE INTO triples (client, sender, recipient, first_seen, last_seen, passed) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                (*key, now, now),
            )
        return tempfail(Reply(451, "4.7.1", GREYLIST_REPLY_TEXT), self.name, "new triple")

    def _cleanup(self, now: float) -> None:
        settings = self.settings
        db = self._db
        with self._transaction():
            db.execute(
                "DELETE FROM triples WHERE (passed = 1 AND last_seen < ?) OR (passed = 0 AND first_seen < ?)",
                (now - settings.remember, now - settings.retry_window),
            )
            db.execute("DELETE FROM clients WHERE last_seen < ?", (now - settings.remember,))
        self._next_cleanup = now + 3600.0
