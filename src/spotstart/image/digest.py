"""OCI content digests (``algorithm:encoded``), checked against the image spec's grammar before
a digest names a file or a URL: a manifest is untrusted input."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from spotstart.errors import InvalidImage, UnsupportedImage

# image-spec descriptor.md: algorithm-component [+._-] separated, encoded [a-zA-Z0-9=_-]+
_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_REGISTERED = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: object) -> Digest:
        if not isinstance(text, str) or not _GRAMMAR.fullmatch(text):
            raise InvalidImage(f"{text!r} is not an OCI digest (algorithm:encoded)")
        algorithm, encoded = text.split(":", 1)
        length = _REGISTERED.get(algorithm)
        if length is None:
            raise UnsupportedImage(f"digest algorithm {algorithm!r} is not sha256 or sha512")
        if len(encoded) != length or not re.fullmatch(r"[0-9a-f]+", encoded):
            raise InvalidImage(f"{text!r}: a {algorithm} digest is {length} lowercase hex digits")
        return cls(algorithm, encoded)

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    @property
    def short(self) -> str:
        return self.encoded[:12]
