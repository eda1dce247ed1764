"""appliance.mail.lineends: every line end CRLF, text already in that form untouched."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.mail.lineends import to_crlf


def reference(data: bytes) -> bytes:
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"\r\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n"]), max_size=30)
)
def test_every_line_end_becomes_crlf(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert to_crlf(data) == reference(data)


def test_text_in_crlf_form_is_returned_as_it_is() -> None:
    data = b"Subject: x\r\n\r\n.line\r\n" * 100
    assert to_crlf(data) is data
    assert to_crlf(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n"
