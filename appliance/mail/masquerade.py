"""Sender masquerading (M-7): inside host names become the organisation's domain on the way out.

sendmail's ``MASQUERADE_AS`` / ``MASQUERADE_DOMAIN`` with ``EXPOSED_USER``:
mail from ``alice@pc12.lan.example.test`` leaves as ``alice@example.test``,
while ``root`` and ``postmaster`` (the exposed users) keep the host name, so
that a reply to a cron job's mail reaches the machine that sent it.

Where: at remote delivery, as a wrapper around the queue runner's
``remote_delivery`` hook.  That is the one place every outgoing message
passes (whatever listener or alias forward it came through), the spool keeps
the original envelope (so a bounce still reaches the inside user, and local
delivery is untouched), and a configuration change applies to mail already
queued.  The envelope sender is rewritten for the SMTP transaction; when the
``From:`` header needs a change too, a rewritten copy of the message is
written next to the spooled one as ``data.masq`` (removed with the message)
and sent instead.  Only the header section's ``From:`` field is touched, and
never in a delivery status report (null envelope sender).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from appliance.mail.interfaces import Reply
from appliance.mail.queue import QueuedMessage, RecipientState

MASQ_DATA = "data.masq"
HEADER_LIMIT = 1024 * 1024
DEFAULT_EXCEPTIONS = ("root", "postmaster")

_ADDRESS = re.compile(rb"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)@([A-Za-z0-9][A-Za-z0-9.-]*[A-Za-z0-9])")


class Masquerader:
    """Rewrites addresses whose domain is one of the hidden host names.

    ``masquerade_as`` is the organisation's domain; ``domains`` are the names
    to hide, each ``host.example.test`` (exactly that name) or
    ``*.example.test`` (every name below example.test, not example.test
    itself); ``exceptions`` are the local parts left alone (case-insensitive).
    """

    def __init__(
        self,
        masquerade_as: str,
        domains: Iterable[str],
        exceptions: Iterable[str] = DEFAULT_EXCEPTIONS,
    ) -> None:
        self.masquerade_as = masquerade_as.strip().lower().rstrip(".")
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        for pattern in domains:
            p = pattern.strip().lower().rstrip(".")
            if p.startswith("*."):
                self.suffixes.append(p[1:])
            elif p:
                self.exact.add(p)
        self.exceptions = frozenset(e.strip().lower() for e in exceptions)

    @property
    def active(self) -> bool:
        """Whether any name is to be hidden."""
        return bool(self.masquerade_as and (self.exact or self.suffixes))

    def hides(self, domain: str) -> bool:
        """Whether ``domain`` is an inside name to be replaced."""
        d = domain.lower().rstrip(".")
        if d == self.masquerade_as:
            return False
        return d in self.exact or any(d.endswith(s) for s in self.suffixes)

    def address(self, address: str) -> str:
        """The masqueraded form of an envelope address (``<>`` and exposed users unchanged)."""
        local, at, domain = address.rpartition("@")
        if not at or not local or local.lower() in self.exceptions or not self.hides(domain):
            return address
        return f"{local}@{self.masquerade_as}"

    def _rewrite_match(self, m: re.Match[bytes]) -> bytes:
        local, domain = m.group(1), m.group(2)
        text = self.address(f"{local.decode('latin-1')}@{domain.decode('latin-1')}")
        return text.encode("latin-1")

    def header(self, head: bytes) -> bytes | None:
        """The header section with the ``From:`` field's addresses masqueraded; None if unchanged."""
        lines = head.split(b"\n")
        out: list[bytes] = []
        changed = False
        in_from = False
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                if in_from:
                    new = _ADDRESS.sub(self._rewrite_match, line)
                    changed = changed or new != line
                    line = new
            else:
                in_from = line[:5].lower() == b"from:"
                if in_from:
                    new = line[:5] + _ADDRESS.sub(self._rewrite_match, line[5:])
                    changed = changed or new != line
                    line = new
            out.append(line)
        return b"\n".join(out) if changed else None


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header section including the blank line, the rest) of the start of a message."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            cut = end + len(sep)
            return data[:cut], data[cut:]
    return data, b""


def masquerade_copy(masquerader: Masquerader, source: Path, target: Path) -> bool:
    """Write ``source`` with its From: masqueraded to ``target``; False (nothing written) if unchanged.

    Blocking; the copy is not fsynced: it is rebuilt from the spooled original on every attempt.
    """
    with open(source, "rb") as f:
        start = f.read(HEADER_LIMIT)
        head, rest = split_header(start)
        new = masquerader.header(head)
        if new is None:
            return False
        temp = target.with_name(target.name + ".tmp")
        with open(temp, "wb") as out:
            out.write(new)
            out.write(rest)
            shutil.copyfileobj(f, out, 64 * 1024)
        os.replace(temp, target)
    return True


Delivery = Callable[[QueuedMessage, Sequence[RecipientState]], Awaitable[Mapping[str, Reply]]]


async def _awaited(awaitable: Awaitable[Mapping[str, Reply]]) -> Mapping[str, Reply]:
    return await awaitable


class MasqueradingDelivery:
    """The runner's ``remote_delivery`` hook with masquerading in front of the real one.

    ``masquerader`` may be replaced at reload; ``blocking`` runs the file copy
    off the reactor (inline when None).
    """

    def __init__(
        self,
        inner: Delivery,
        masquerader: Masquerader,
        blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.inner = inner
        self.masquerader = masquerader
        self._blocking = blocking or (lambda f, *a: defer.execute(f, *a))

    def __call__(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> Deferred[Mapping[str, Reply]]:
        return defer.ensureDeferred(_awaited(self.deliver(message, recipients)))

    def deliver(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> Awaitable[Mapping[str, Reply]]:
        """:meth:`__call__` for a caller that awaits (the runner): no layer of its own when idle."""
        if not self.masquerader.active or not message.envelope.sender:
            return self.inner(message, recipients)  # nothing to rewrite
        return self._deliver(message, recipients)

    async def _deliver(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> Mapping[str, Reply]:
        masq = self.masquerader
        sender = message.envelope.sender
        if not masq.active or not sender:
            # Reports from this box (null sender) go out as the box wrote them.
            return await self.inner(message, recipients)
        new_sender = masq.address(sender)
        target = message.data_path.with_name(MASQ_DATA)
        rewritten = await self._blocking(masquerade_copy, masq, message.data_path, target)
        if new_sender == sender and not rewritten:
            return await self.inner(message, recipients)
        outgoing = replace(
            message,
            envelope=replace(message.envelope, sender=new_sender),
            data_path=target if rewritten else message.data_path,
            data=None if rewritten else message.data,
        )
        return await self.inner(outgoing, recipients)


__all__ = ["Masquerader", "MasqueradingDelivery", "masquerade_copy", "split_header"]
