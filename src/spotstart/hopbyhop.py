"""Headers a proxy must not forward (RFC 9110 section 7.6.1), for the guard and the router."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy


def forwardable(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], hop_by_hop: frozenset[str]
) -> CIMultiDict[str]:
    """``headers`` less ``hop_by_hop`` (lower-case names) and whatever ``Connection`` names."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower not in hop_by_hop and lower not in named:
            out.add(key, value)
    return out
