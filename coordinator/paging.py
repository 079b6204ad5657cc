"""Paged listings: a page of items after a position, and an opaque token
for the next one.

A token encodes the sort key of the last item returned, not an offset, so
items published or deleted between two calls never make a page skip or
repeat one: each item present throughout is returned exactly once, and new
ones appear if they sort after the position reached.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Callable, Sequence, TypeVar

from coordinator.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Item = TypeVar("Item")
Key = tuple


def page_of(items: Sequence[Item], key: Callable[[Item], Key], page_size: int,
            page_token: str) -> tuple[list[Item], str]:
    """The page of `items` (sorted by `key`) that `page_token` asks for, and
    the token of the next page ("" after the last).

    Args:
        page_size: 0 means DEFAULT_PAGE_SIZE; above MAX_PAGE_SIZE, that.
        page_token: "" for the first page, else a `next_page_token`.

    Raises:
        InvalidArgument: a negative page_size, or a token this server did
            not issue for a listing of this kind.

    Example:
    >>> page, token = page_of(records, lambda r: (r.name, r.version), 0, "")
    """
    if page_size < 0:
        raise InvalidArgument("page_size", f"{page_size} is negative; use 0 for the default "
                                           f"({DEFAULT_PAGE_SIZE}) or up to {MAX_PAGE_SIZE}.")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    kinds = tuple(type(part) for part in key(items[0])) if items else None
    after = _decode(page_token, kinds) if page_token else None
    remaining = [item for item in items if after is None or key(item) > after]
    page = remaining[:size]
    return page, (_encode(key(page[-1])) if len(remaining) > size else "")


def _encode(key: Key) -> str:
    return base64.urlsafe_b64encode(json.dumps(["after", *key]).encode()).decode().rstrip("=")


def _decode(token: str, kinds: tuple[type, ...] | None) -> Key | None:
    """The position `token` holds; None when the listing is empty (nothing
    comes after anything then)."""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        decoded = None
    if not (isinstance(decoded, list) and decoded[:1] == ["after"]
            and all(type(part) in (str, int) for part in decoded[1:])
            and (kinds is None or tuple(type(part) for part in decoded[1:]) == kinds)):
        raise InvalidArgument("page_token", "it is not a token this server issued; pass the "
                                            "next_page_token of the previous reply, or "
                                            "nothing for the first page.")
    return tuple(decoded[1:]) if kinds is not None else None
