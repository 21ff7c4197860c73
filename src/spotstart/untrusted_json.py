"""JSON from parties spotstart does not control (registries and their token services, image
archives, event and log files, Kubernetes dumps): nesting bounded before a byte is parsed,
its values counted (what parsing costs in memory), NaN/Infinity and overflowing numbers
refused, lone surrogates replaced, and every way the
standard parser can fail turned into one :class:`JSONRejected` (a ValueError). Callers bound
the size of what they read; this module bounds what parsing it can cost.

Example::

    doc = parse(body, what="registry.example/app token answer")  # JSONRejected if hostile
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Deeper than any document we read: an OCI manifest nests 4 levels, a Kubernetes List of Pods
# with managedFields about 20. Python's own parser stops near 1,000 with RecursionError.
MAX_DEPTH = 64
# Values (arrays, objects, and what commas separate) a document may hold: parsed, each costs
# 50-100 bytes however few it took in the text (``{},`` is 3 bytes and a 64-byte dict: 64 MiB
# of them parsed to 1.8 GB), so their count, not the text's size, bounds parsing's memory:
# ~400 MB at most. A Kubernetes List of 4,000 pods with managedFields holds ~2 million.
MAX_VALUES = 4_000_000

# Structure is measured on the UTF-8 bytes (no structural byte occurs inside a multibyte
# character) a chunk at a time, so what measuring holds is bounded by the chunk, whatever the
# text: a regex substitution over the whole text builds a list of every piece between its
# matches (60 MB of ``{},`` made 20 million, 1.7 GB, in this check's first version).
_CHUNK = 1 << 20
_CLOSED_STRING = re.compile(rb'"[^"]*"')  # once escapes are gone, a string has no quote inside
_TO_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _structure(text: str, max_depth: int) -> tuple[bool, int]:
    """(whether arrays and objects nest deeper than ``max_depth``, how many values) of
    ``text`` outside its strings: values are the arrays, objects and what commas separate
    (an estimate of what parsing allocates). Linear time; memory a few copies of ``text``'s
    bytes and one chunk's pieces."""
    # Escapes first, left to right as JSON pairs them: an escaped backslash, then an escaped
    # quote. What is left of a string is a quote, no quote, a quote.
    data = text.encode("utf-8", "replace").replace(b"\\\\", b"").replace(b'\\"', b"")
    values = 0
    brackets = []
    inside = False  # whether the chunk starts inside a string
    for at in range(0, len(data), _CHUNK):
        chunk = data[at : at + _CHUNK]
        if inside:
            end = chunk.find(b'"')
            if end < 0:
                continue
            chunk, inside = chunk[end + 1 :], False
        bare = _CLOSED_STRING.sub(b"", chunk)
        quote = bare.find(b'"')
        if quote >= 0:  # a string that goes on into the next chunk
            bare, inside = bare[:quote], True
        values += bare.count(b",") + bare.count(b"[") + bare.count(b"{")
        brackets.append(bare.translate(_TO_SQUARE, _NOT_BRACKET))
    # Each pass drops every innermost pair ("[]" is always one): after k passes what nests
    # deeper than k, and only that, still holds a "[]". A pass runs at memcpy speed and the
    # text shrinks: 64 passes over 60 MB of brackets take about a second.
    nest = b"".join(brackets)
    del brackets
    for _ in range(max_depth):
        if b"[]" not in nest:
            break
        nest = nest.replace(b"[]", b"")
    return b"[]" in nest, values


class JSONRejected(ValueError):
    """Not JSON we accept: malformed, nested too deep, or a number that is no finite value."""


def nesting_depth_exceeds(text: str, max_depth: int = MAX_DEPTH) -> bool:
    """Whether ``text`` nests arrays and objects deeper than ``max_depth``, without parsing
    it (strings' contents not counted). Bracket kinds are not matched: the parser says what
    is wrong with unbalanced text."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    return _structure(text, max_depth)[0]


def value_count_exceeds(text: str, max_values: int = MAX_VALUES) -> bool:
    """Whether ``text`` holds more than ``max_values`` values (arrays, objects and what
    commas separate, strings' contents not counted), without parsing it."""
    if text.count(",") + text.count("[") + text.count("{") < max_values:
        return False
    return _structure(text, MAX_DEPTH)[1] >= max_values


def _constant(name: str) -> Any:
    raise JSONRejected(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRejected(f"{text[:40]} overflows a float")
    return value


def parse(
    data: bytes | str, *, what: str, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES
) -> Any:
    """``data`` as JSON (bytes are UTF-8; a byte that is not becomes U+FFFD), or
    :class:`JSONRejected` naming ``what`` and the cause on one line."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    openers = text.count("[") + text.count("{")
    if openers > max_depth or openers + text.count(",") >= max_values:
        too_deep, values = _structure(text, max_depth)  # one pass, only when it may be over
        if too_deep:
            raise JSONRejected(f"{what}: JSON nested deeper than {max_depth} levels")
        if values >= max_values:
            raise JSONRejected(f"{what}: JSON of more than {max_values:,} values")
    try:
        doc = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except JSONRejected as exc:
        raise JSONRejected(f"{what}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise JSONRejected(f"{what}: not JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit integer; nesting we missed
        raise JSONRejected(f"{what}: not JSON we read ({str(exc)[:80]})") from None
    if _SURROGATE_ESCAPE.search(text):
        doc = _scrub(doc)
    return doc


def _clean(s: str) -> str:
    return s.encode("utf-8", "replace").decode("utf-8")


def _scrub(doc: Any) -> Any:
    """Lone surrogates (``"\\ud800"``) replaced by ``?``: such a string cannot be printed or
    written as UTF-8. Iterative: only reached when the text has such an escape."""
    if isinstance(doc, str):
        return _clean(doc)
    root = [doc]
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, str):
                    node[i] = _clean(v)
                elif isinstance(v, (list, dict)):
                    stack.append(v)
        else:
            for k in list(node):
                v = node.pop(k)
                if isinstance(v, str):
                    v = _clean(v)
                elif isinstance(v, (list, dict)):
                    stack.append(v)
                node[_clean(k)] = v
    return root[0]
