"""Paging as the Graph API pages: a page is a window of the unfiltered result set, filtered afterwards.

Graph API Paginated Results, Cursor-based Pagination: "limit: ... A query may return fewer than the value of limit
due to filtering. Do not depend on the number of results being fewer than the limit value to indicate that your query
reached the end of the list of data, use the absence of next instead"; "next: ... If not included, this is the last
page of data. Due to how pagination works with visibility and privacy, it is possible that a page may be empty but
contain a 'next' paging link. Stop paging when the 'next' link no longer appears."

Two edges page differently from the standard:
- hashtag recent_media and top_media: one ``after`` cursor, the same on every page, and no ``before``; the ``next``
  link is the way on (``hashtag_paging``);
- the media edge of business_discovery: ``before`` and ``after`` cursors, no ``next`` or ``previous``
  (``discovery_paging``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from yarl import URL

from deeptarget.sandbox.faults import Faults
from deeptarget.sandbox.limits import bad_request
from deeptarget.sandbox.network import Media

PAGING_TOKEN = "__paging_token"


def _encode(*parts: object) -> str:
    return base64.urlsafe_b64encode(":".join(str(p) for p in parts).encode()).decode()


def _decode(cursor: str, kind: str, n_parts: int) -> list[str]:
    try:
        parts = base64.urlsafe_b64decode(cursor.encode()).decode().split(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        parts = []
    if len(parts) != n_parts or parts[0] != kind:
        # The reference pages' Error Codes tables: "100: Invalid parameter" (that a cursor the API did not give gets
        # it is assumed).
        raise bad_request("(#100) Invalid parameter")
    return parts


def _offset(value: str) -> int:
    try:
        return max(0, int(value))
    except ValueError as err:
        raise bad_request("(#100) Invalid parameter") from err


def visible_page(items: list[Media], offset: int, limit: int, faults: Faults) -> list[Media]:
    """The page at ``offset``: ``limit`` media of the unfiltered result set, less those the caller may not see."""
    chunk = items[offset : offset + limit]
    if faults.duplicate_across_pages and offset > 0:  # the last post the previous pages gave, again
        chunk = [m for m in items[:offset] if m.visible][-1:] + chunk
    return [m for m in chunk if m.visible]


def hashtag_result_set(hashtag_id: str, edge: str) -> str:
    """The ``after`` cursor of every page of one hashtag edge: it names the result set, not a place in it."""
    return _encode("rs", hashtag_id, edge)


def hashtag_offset(after: str | None, paging_token: str | None, result_set: str, limit: int) -> int:
    """Where the page a hashtag request asks for starts."""
    if after is not None and after != result_set:
        raise bad_request("(#100) Invalid parameter")
    if paging_token:
        _, result, offset = _decode(paging_token, "pt", 3)
        if result != result_set:
            raise bad_request("(#100) Invalid parameter")
        return _offset(offset)
    # IG Hashtag Recent Media, Limitations: "the after cursor value will always be the same for each page, but it can
    # still be used to get the next page of results in the result set": taken at its word, the cursor alone gets the
    # page after the first.
    return limit if after else 0


def hashtag_paging(
    url: URL, result_set: str, offset: int, limit: int, total: int, faults: Faults
) -> dict[str, Any] | None:
    """The ``paging`` of a hashtag page, None for an empty result set."""
    if total == 0:
        return None
    # IG Hashtag Recent Media (Top Media alike), Limitations: "This endpoint only returns an after cursor for paginated
    # results; a before cursor will not be included. In addition, the after cursor value will always be the same for
    # each page".
    paging: dict[str, object] = {"cursors": {"after": result_set}}
    if offset + limit < total:
        # Graph next links carry opaque parameters of their own (__paging_token and the like) besides the cursor;
        # that the position travels in one is our model. The link repeats the request's query, access_token too when
        # it came there: the Paginated Results samples show links without a token, real answers repeat the one they
        # were asked with (seen in the field); a token sent in a header is not copied into the link.
        next_offset = 0 if faults.cursor_loop_after == offset else offset + limit
        query = [(k, v) for k, v in url.query.items() if k not in ("after", PAGING_TOKEN)]
        query += [("after", result_set), (PAGING_TOKEN, _encode("pt", result_set, next_offset))]
        paging["next"] = str(url.with_query(query))
    return paging


def discovery_cursor(account_id: str, offset: int) -> str:
    return _encode("bd", account_id, offset)


def discovery_offset(after: str | None, before: str | None, account_id: str, limit: int) -> int:
    """Where the page of business_discovery's ``media.after(..)`` / ``media.before(..)`` starts."""
    for cursor, back in ((after, 0), (before, limit)):
        if cursor:
            _, account, offset = _decode(cursor, "bd", 3)
            if account != account_id:
                raise bad_request("(#100) Invalid parameter")
            return max(0, _offset(offset) - back)
    return 0


def discovery_paging(account_id: str, offset: int, limit: int, total: int, faults: Faults) -> dict[str, Any] | None:
    """The ``paging`` of a business_discovery media page, None when the media fit one page."""
    # IG User Business Discovery, Pagination: "the response will include before and after cursors if the response
    # contains multiple pages of data. Unlike standard cursor-based pagination, however, the response will not
    # include previous or next fields, so you will have to use the before and after cursors to construct previous
    # and next query strings manually".
    if total <= limit:
        return None
    cursors = {"before": discovery_cursor(account_id, offset)}
    # How the last page says it is the last, the docs leave unsaid; ours has no after cursor (its before stays). The
    # cursors are places in the unfiltered result set, so a page that filtering emptied still carries them.
    if offset + limit < total:
        cursors["after"] = discovery_cursor(account_id, 0 if faults.cursor_loop_after == offset else offset + limit)
    return {"cursors": cursors}
