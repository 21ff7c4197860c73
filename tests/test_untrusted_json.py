"""Red team of the untrusted JSON reader: its depth and value checks agree with the parser on
any document (strings full of brackets, escaped quotes and backslashes, a string or an
escape cut at any chunk boundary), and the checks themselves cost memory bounded by the
text, not by how many values it packs in (60 MB of ``{},`` cost 1.7 GB in the depth check
alone before)."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotstart import untrusted_json
from spotstart.untrusted_json import JSONRejected, nesting_depth_exceeds, parse

_tricky = st.text(alphabet='[]{}",:\\ab\u00e9\u2603', max_size=12)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), _tricky)
_doc = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_tricky, inner, max_size=4)
    ),
    max_leaves=40,
)


def _depth(doc: Any) -> int:
    if isinstance(doc, list):
        return 1 + max(map(_depth, doc), default=0)
    if isinstance(doc, dict):
        return 1 + max(map(_depth, doc.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(doc=_doc, limit=st.integers(0, 8), chunk=st.sampled_from([1, 2, 3, 7, 1 << 20]))
def test_the_depth_check_agrees_with_the_document(doc: Any, limit: int, chunk: int) -> None:
    """Any chunking (a string, an escape or a bracket run cut anywhere): the same answer."""
    text = json.dumps(doc, ensure_ascii=False)
    old, untrusted_json._CHUNK = untrusted_json._CHUNK, chunk
    try:
        assert nesting_depth_exceeds(text, limit) == (_depth(doc) > limit), text
    finally:
        untrusted_json._CHUNK = old


@pytest.mark.parametrize(
    "text",
    [
        '["' + "]" * 100 + '", ' + "[" * 65 + "]" * 65 + "]",  # closers in a string
        '["\\"' + "]" * 100 + '", ' + "[" * 65 + "]" * 65 + "]",  # an escaped quote first
        '["\\\\", ' + "[" * 65 + "]" * 65 + "]",  # an escaped backslash ends the string
        '{"a":' * 65 + "1" + "}" * 65,
        "[" + "[]," * 200 + "[" * 65 + "]" * 66,
    ],
)
def test_deep_documents_behind_string_tricks_are_refused(text: str) -> None:
    json.loads(text)  # valid JSON, 65 levels or more
    with pytest.raises(JSONRejected, match="nested deeper than 64"):
        parse(text, what="t")


@pytest.mark.parametrize(
    "text",
    [
        '["' + "[" * 1000 + '"]',  # openers only in a string
        '["\\"' + "[" * 1000 + '"]',
        "[" * 64 + "]" * 64,
    ],
)
def test_shallow_documents_with_many_brackets_in_strings_are_read(text: str) -> None:
    assert parse(text, what="t") == json.loads(text)


def test_truncated_and_unbalanced_text_is_not_json_not_deep() -> None:
    with pytest.raises(JSONRejected, match="not JSON"):
        parse('{"a": [1, 2', what="t")
    with pytest.raises(JSONRejected):  # unterminated and deep: refused either way, no crash
        parse("[" * 100_000, what="t")


def test_many_tiny_values_are_refused_before_parsing_with_bounded_memory() -> None:
    """5 million empty objects in 15 MB: parsed, 360 MB of dicts (the 64 MiB a timeline
    document may be: 1.8 GB). Refused now, and the checks hold a few copies of the text."""
    text = "[" + "{}," * 5_000_000 + "{}]"
    tracemalloc.start()
    try:
        with pytest.raises(JSONRejected, match="more than 4,000,000 values"):
            parse(text, what="t")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * len(text), peak


def test_a_realistic_document_under_the_bounds_is_read() -> None:
    pods = {"kind": "List", "items": [{"metadata": {"name": f"p{i}"}} for i in range(50_000)]}
    assert parse(json.dumps(pods), what="t") == pods
