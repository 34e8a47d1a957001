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
_known: set[str] = set()  # passwords seen in URLs this process opened


_QUERY_PASSWORD = re.compile(r"(?i)[?&](?:ssl)?pass(?:word|wd)?=|[?&]pwd=")
_NEXT_PARAM = re.compile(r"&[A-Za-z_][A-Za-z0-9_]*=")


def _query_password(url: str) -> tuple[int, int] | None:
    """(start, end) of a password given in the query string: up to the next `&name=`, or the end."""
    match = _QUERY_PASSWORD.search(url)
    if not match:
        return None
    following = _NEXT_PARAM.search(url, match.end())
    return match.end(), following.start() if following else len(url)


def split_userinfo(url: str) -> tuple[str, str | None, str | None, str] | None:
    """(scheme://, user, password, rest after '@') of a URL with user-info, else None.

    The user-info ends at the last '@' before any query-string password: a password's own '@',
    ':', '/' or '?' stay in it.
    """
    match = _SCHEME.match(url)
    if not match:
        return None
    query = _query_password(url)
    head, body = match.group(0), url[match.end():query[0] if query else len(url)]
    at = body.rfind("@")
    if at < 0:
        return None
    userinfo, rest = body[:at], url[match.end() + at + 1:]
    user, colon, password = userinfo.partition(":")
    return head, user, password if colon else None, rest


def _mask_query(url: str, replace) -> str:
    query = _query_password(url)
    if query is None:
        return url
    start, end = query
    return url[:start] + replace(url[start:end]) + url[end:]


def mask_url(url: str) -> str:
    """The URL with its password (user-info and query string) replaced by ***."""
    def hide(password: str) -> str:
        remember(password)
        return MASK

    parts = split_userinfo(url)
    if parts is not None:
        head, user, password, rest = parts
        if password is not None:
            url = f"{head}{user}:{hide(password)}@{rest}"
    return _mask_query(url, hide)


def encode_password(url: str) -> str:
    """The URL with its password percent-encoded (user-info and query string), so any password
    reaches the driver intact."""
    def encode(password: str) -> str:
        return password if "%" in password else quote(password, safe="")  # "%": already encoded

    url = _mask_query(url, encode)
    parts = split_userinfo(url)
    if parts is None or parts[2] is None:
        return url
    head, user, password, rest = parts
    return f"{head}{user}:{encode(password)}@{rest}"


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
