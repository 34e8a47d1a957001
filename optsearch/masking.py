"""Passwords never reach the screen or a log: masking storage URLs and any text that holds one.

A password may hold `@`, `:`, `/`, `?` or `&` unencoded; a URL may carry it in its query string
(`?password=...`); a driver may echo part of it back in an error ("failed to resolve host
'dor&3@127.0.0.1'"). `mask_url` reads the user-info up to the *last* `@` of the authority, so
everything between the user name and the host is hidden whatever it holds; `mask_text` masks every
URL in a text, password query parameters, and any fragment of a known password.
"""

from __future__ import annotations

import re
from urllib.parse import quote

MASK = "***"
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_QUERY_SECRET = re.compile(r"(?i)\b((?:ssl)?pass(?:word|wd)?|pwd)=[^&\s'\"]*")
_known: set[str] = set()  # passwords seen in URLs this process opened


def split_userinfo(url: str) -> tuple[str, str | None, str | None, str] | None:
    """(scheme://, user, password, rest after '@') of a URL with user-info, else None.

    The authority ends at the last '@' before the path: a password's own '@', ':' or '/' stay in it.
    """
    match = _SCHEME.match(url)
    if not match:
        return None
    head, body = match.group(0), url[match.end():]
    at = body.rfind("@")
    if at < 0:
        return None
    userinfo, rest = body[:at], body[at + 1:]
    user, colon, password = userinfo.partition(":")
    return head, user, password if colon else None, rest


def mask_url(url: str) -> str:
    """The URL with its password (user-info and query string) replaced by ***."""
    parts = split_userinfo(url)
    if parts is not None:
        head, user, password, rest = parts
        if password is not None:
            remember(password)
            url = f"{head}{user}:{MASK}@{rest}"
    return _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", url)


def encode_password(url: str) -> str:
    """The URL with its password percent-encoded, so any password reaches the driver intact."""
    parts = split_userinfo(url)
    if parts is None or parts[2] is None:
        return url
    head, user, password, rest = parts
    if "%" in password:  # already encoded by the user
        return url
    return f"{head}{user}:{quote(password, safe='')}@{rest}"


def remember(password: str) -> None:
    """Mask this password (and its '@'/':'/'/'-separated pieces) wherever it appears later."""
    if password:
        _known.add(password)
        for separators in (r"[@:/]", r"[@:/?&]"):
            _known.update(piece for piece in re.split(separators, password) if len(piece) >= 3)


def mask_text(text: str) -> str:
    """Every URL's password, password query parameters and known password fragments, masked."""
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, MASK)
        encoded = quote(secret, safe="")
        if encoded != secret:
            text = text.replace(encoded, MASK)
    words = re.split(r"(\s+)", text)
    return "".join(mask_url(word) if _SCHEME.search(word) else word for word in words)
