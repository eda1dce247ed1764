"""The seams between the SMTP protocol, the policy that judges it and the queue that stores it.

The protocol knows only these shapes; the queue and the recipient lookup know
nothing of sockets.  Every method that may wait on a neighbour (disk, LDAP,
DNS) returns a Deferred, so one slow lookup never blocks the reactor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: basic code, RFC 3463 enhanced code and text."""

    code: int
    enhanced: str
    text: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True)
class Envelope:
    """What the SMTP transaction established about one message.

    ``sender`` is ``""`` for the null reverse-path ``<>``.  ``listener`` names
    the listener that accepted it (``outside``, ``inside``, ``submission``).
    """

    sender: str
    recipients: tuple[str, ...]
    client_address: str
    client_helo: str
    listener: str
    protocol: str
    received_at: float
    authenticated_user: str | None = None
    mail_parameters: dict[str, str] = field(default_factory=dict)


class IncomingMessage(Protocol):
    """A message being received into the spool; nothing of it is visible until commit."""

    queue_id: str

    def write(self, data: bytes) -> None:
        """Append message bytes (already dot-unstuffed, CRLF line ends)."""

    def commit(self, envelope: Envelope) -> Deferred[str]:
        """Make the message durable (fsync, rename); fires with the queue id.

        Fails (with OSError, for example) when it could not be made durable;
        the server then answers 452 4.3.1 and the message does not exist.
        """

    def abort(self) -> None:
        """Discard what was written; safe to call more than once."""


class MessageStore(Protocol):
    """The spool as the SMTP server sees it."""

    def begin(self) -> IncomingMessage:
        """Start receiving a new message; raises OSError when the spool is unusable."""


class RecipientCheck(Protocol):
    """Whether a recipient in a domain this box accepts for exists.

    Fires with None when the address is deliverable, or with the Reply to send
    (550 5.1.1 unknown user, 451 4.4.3 directory unavailable, ...).
    """

    def check_recipient(self, address: str) -> Deferred[Reply | None]:
        ...
