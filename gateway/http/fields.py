"""Integers a client writes in headers and query strings, read strictly. ``str.isdigit`` takes
'²' and '٣', which ``int`` then refuses, and ``int`` refuses more than 4,300 digits: both were
500s. Here either is a 400 that names the field."""

from __future__ import annotations

from gateway.errors import BadRequest, cut

_MAX_DIGITS = 19  # any value past this exceeds every maximum we accept (2**63 has 19 digits)


def integer(field: str, raw: str, maximum: int, minimum: int = 0) -> int:
    """``raw`` as an int in [minimum, maximum]: ASCII digits only, surrounding spaces allowed."""
    text = raw.strip()
    if not text or len(text) > _MAX_DIGITS or not (text.isascii() and text.isdigit()):
        raise BadRequest(
            f"{field}: must be an integer in [{minimum}, {maximum}], got {cut(raw, 40)!r}"
        )
    value = int(text)
    if not minimum <= value <= maximum:
        raise BadRequest(f"{field}: must be an integer in [{minimum}, {maximum}], got {value}")
    return value
