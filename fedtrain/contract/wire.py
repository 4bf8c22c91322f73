"""The bounds and patterns every document between coordinator and site is checked against, and how a check reads.

The bottom of the site protocol: `sitetask` (tasks and answers) and `secmessages` (secure
aggregation's messages, which a site task carries) both check names, rounds and attempts against
these, so they live apart from either; `sitetask` re-exports them.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

MAX_ATTEMPT = 9999  # attempts of one task: the engine retries far fewer; an update's key holds at most 4 digits
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a site's name: a DNS label
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_ROUND = 10000  # spec.rounds' bound
# Characters a site's free text may not carry into a status, an Event or the coordinator's terminal:
# C0 and C1 controls but tab and newline (escape sequences, carriage returns, NUL) and the bidirectional
# embeddings, overrides and isolates, which make text read other than it is.
_UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def showable(text: str) -> str:
    """A site's free text with each character that could act on a display replaced by U+FFFD.

    Replaced, not refused: an honest worker's reason may quote a library's coloured message, and
    what it says is worth keeping; what it could do to a terminal or a reader is not.
    """
    return _UNSHOWABLE.sub("\ufffd", text)


def problems(error: ValidationError, limit: int = 3) -> str:
    """A validation error in one line, each problem naming its field: ``output.accuracy: ... (got 7.0)``."""
    found = []
    for item in error.errors(include_url=False)[:limit]:
        where = ".".join(str(part) for part in item["loc"]) or "the document"
        got = repr(item.get("input"))
        shown = f" (got {got[:40]}{'…' if len(got) > 40 else ''})" if item["type"] not in ("missing", "value_error") \
            else ""
        found.append(f"{where}: {item['msg'].removeprefix('Value error, ')}{shown}")
    more = f"; and {error.error_count() - limit} more" if error.error_count() > limit else ""
    return "; ".join(found) + more
