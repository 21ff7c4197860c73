"""JSON from parties spotstart does not control (registries and their token services, image
archives, event and log files, Kubernetes dumps): nesting bounded before a byte is parsed,
NaN/Infinity and overflowing numbers refused, lone surrogates replaced, and every way the
standard parser can fail turned into one :class:`JSONRejected` (a ValueError). Callers bound
the size of what they read; this module bounds what parsing it can cost.

Example::

    doc = parse(body, what="registry.example/app token answer")  # JSONRejected if hostile
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from typing import Any

# Deeper than any document we read: an OCI manifest nests 4 levels, a Kubernetes List of Pods
# with managedFields about 20. Python's own parser stops near 1,000 with RecursionError.
MAX_DEPTH = 64

# Strings removed before brackets are counted. Possessive and matching to the end when a
# string is never closed: linear on any input (a plain ``"(?:[^"\\]|\\.)*"`` is quadratic on
# ``"\"\"\"...``, rescanning from every quote).
_STRING = re.compile(r'"[^"\\]*+(?:\\[\s\S]?[^"\\]*+)*+(?:"|\Z)')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_ONE_KIND = str.maketrans("{}", "[]")
_RUN = re.compile(r"\[+|\]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class JSONRejected(ValueError):
    """Not JSON we accept: malformed, nested too deep, or a number that is no finite value."""


def nesting_depth_exceeds(text: str, max_depth: int = MAX_DEPTH) -> bool:
    """Whether ``text`` nests arrays and objects deeper than ``max_depth``, without parsing
    it: strings dropped, brackets kept, and the depth summed over runs of openers and closers
    (a run is one step however long: ``[[[[...]]]]`` costs two). Bracket kinds are not
    matched: the parser says what is wrong with unbalanced text."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_ONE_KIND)
    if not brackets.startswith("["):
        return False
    steps = list(map(len, _RUN.findall(brackets)))  # opener and closer runs alternate
    steps[1::2] = map(operator.neg, steps[1::2])
    return max(itertools.accumulate(steps)) > max_depth


def _constant(name: str) -> Any:
    raise JSONRejected(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRejected(f"{text[:40]} overflows a float")
    return value


def parse(data: bytes | str, *, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """``data`` as JSON (bytes are UTF-8; a byte that is not becomes U+FFFD), or
    :class:`JSONRejected` naming ``what`` and the cause on one line."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if nesting_depth_exceeds(text, max_depth):
        raise JSONRejected(f"{what}: JSON nested deeper than {max_depth} levels")
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
