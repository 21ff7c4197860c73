"""A streaming tar reader that sees headers only: it is fed decompressed bytes in any chunking
and yields one :class:`TarEntry` per member, skipping file data without copying it.

Why not ``tarfile``: measured on a 646 MB layer of 20,000 files, ``tarfile`` in stream mode
spends 1.3 s on top of 0.6 s of inflate (65 us a member), this reader 0.1 s. It reads what
image layers use (POSIX ustar and pax, GNU long names and sparse headers, V7) and checks each
header's checksum; it is not a writer and never extracts. Where readers differ, it reads as
Go's archive/tar does (what containerd and Docker extract): a global pax header applies to
nothing, a GNU long name wins over a pax path, old GNU sparse maps continue in extension
headers before the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spotstart.errors import InvalidImage

BLOCK = 512
EntryKind = Literal["file", "dir", "symlink", "hardlink", "other"]
_KINDS: dict[bytes, EntryKind] = {
    b"0": "file",
    b"\0": "file",
    b"7": "file",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "other",
    b"4": "other",
    b"5": "dir",
    b"6": "other",
}
_META = (b"x", b"g", b"L", b"K")  # pax per-file / global headers, GNU long name / long link
_META_LIMIT = 1 << 20  # a pax header or long name beyond 1 MiB is not a real one
# The pax keys this reader uses; others (mtime, uid, xattrs...) are dropped as read.
_PAX_KEYS = frozenset({"path", "linkpath", "size"})


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member as the archive names it. ``size``: the bytes it stores (what a pull moves;
    for a GNU sparse file the stored part); ``linkname``: a link's target."""

    name: str
    kind: EntryKind
    size: int
    linkname: str = ""
    mode: int = 0


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for values too big for octal
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    # As Go's archive/tar: NULs and spaces trimmed at both ends, then octal digits only.
    # Cut at the first NUL instead (as tarfile does), "\0" + "0001000" was a size of 0 to
    # us and 512 to containerd: that member's data read as headers of members it never
    # extracts.
    text = field.strip(b" \0")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise InvalidImage(f"tar header field {field!r} is not an octal number")
    return int(text, 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = unsigned - 2 * sum(b for b in blanked if b > 127)  # some old tars sum signed chars
    return stored in (unsigned, signed)


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise InvalidImage("malformed pax extended header")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise InvalidImage("malformed pax extended header")
        key, sep, value = record[:-1].partition(b"=")
        if not sep:
            raise InvalidImage("malformed pax extended header")
        name = key.decode("utf-8", "surrogateescape")
        if name in _PAX_KEYS:
            records[name] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class TarScanner:
    """Feed decompressed bytes with :meth:`feed`; each call returns the members whose headers
    it completed. :meth:`close` checks the archive did not stop inside a member. ``bytes_seen``
    counts every byte fed (the layer's uncompressed size)."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._skip = 0  # data (and padding) of the current member still to pass over
        self._collect: bytearray | None = None  # data of a pax / long-name member being read
        self._collect_left = 0
        self._meta_kind = b""
        self._meta_size = 0
        self._pax: dict[str, str] = {}
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._zero_blocks = 0
        # an old GNU sparse member's extension headers still to come, then its data
        self._sparse_ext = False
        self._sparse_data = 0
        self.ended = False
        self.bytes_seen = 0

    def feed(self, chunk: bytes | memoryview) -> list[TarEntry]:
        view = memoryview(chunk)
        self.bytes_seen += len(view)
        out: list[TarEntry] = []
        pos, end = 0, len(view)
        while pos < end:
            if self.ended:
                return out  # what follows the end marker is padding
            if self._collect is not None:
                take = min(self._collect_left, end - pos)
                self._collect += view[pos : pos + take]
                self._collect_left -= take
                pos += take
                if self._collect_left == 0:
                    self._finish_meta()
                continue
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                continue
            need = BLOCK - len(self._header)
            if not self._header and end - pos >= BLOCK:
                block = bytes(view[pos : pos + BLOCK])
                pos += BLOCK
            else:
                take = min(need, end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < BLOCK:
                    continue
                block = bytes(self._header)
                self._header.clear()
            entry = self._on_header(block)
            if entry is not None:
                out.append(entry)
        return out

    def close(self) -> None:
        if self._header or self._skip or self._collect is not None or self._sparse_ext:
            raise InvalidImage("the layer's tar stream is truncated inside a member")
        if self._long_name is not None or self._pax:
            raise InvalidImage("the layer's tar stream ends after an extended header")

    def _on_header(self, block: bytes) -> TarEntry | None:
        if self._sparse_ext:
            # An old GNU sparse member's extension header (21 more map entries, then its own
            # "extended" flag): between the header and the data, read as headers by every
            # extractor. Skipped as data instead, a member's last blocks would be read as
            # headers, members extractors never see (or hide the ones they do).
            if block[504] == 0:
                self._sparse_ext = False
                self._skip = self._sparse_data
            return None
        if block.count(0) == BLOCK:
            self._zero_blocks += 1
            if self._zero_blocks >= 2:
                self.ended = True
            return None
        if self._zero_blocks:
            raise InvalidImage("a lone zero block inside the layer's tar stream")
        if not _checksum_ok(block):
            raise InvalidImage("tar header checksum mismatch: the layer is corrupt or not a tar")
        typeflag = block[156:157]
        size = _number(block[124:136])
        if size < 0:
            raise InvalidImage("tar header with a negative size")
        padded = -(-size // BLOCK) * BLOCK
        if typeflag in _META:
            if size > _META_LIMIT:
                raise InvalidImage(f"tar extended header of {size} bytes")
            self._meta_kind = typeflag
            self._meta_size = size
            self._collect = bytearray()
            self._collect_left = padded
            if padded == 0:
                self._finish_meta()
            return None
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:
            # star's header ends its prefix at 476 (times follow) and says so at 508
            star = block[508:512] == b"tar\0"
            name = _text(block[345 : 476 if star else 500]) + "/" + name
        linkname = _text(block[157:257])
        # Names as Go's archive/tar (and so containerd and Docker) gives them to the
        # extractor: the pax record, then a GNU long name over it. What an extractor does
        # not see must not be what we report.
        records = self._pax
        name = records.get("path", name)
        linkname = records.get("linkpath", linkname)
        if self._long_name is not None:
            name = self._long_name
        if self._long_link is not None:
            linkname = self._long_link
        if "size" in records:
            # decimal digits only: int() would take "-600" (a member reading backwards),
            # " 5" and "5_0"; 20 digits hold any 64-bit size
            text = records["size"]
            if not (0 < len(text) <= 20 and text.isascii() and text.isdigit()):
                raise InvalidImage(f"pax size record {text[:24]!r} is not a byte count")
            size = int(text)
            padded = -(-size // BLOCK) * BLOCK
        self._pax, self._long_name, self._long_link = {}, None, None
        kind = _KINDS.get(typeflag, "file")  # unknown types store data like files (POSIX)
        if typeflag == b"S":
            if block[257:265] != b"ustar  \0":
                # Go's archive/tar (and so containerd) refuses an 'S' member in any other
                # format: star's sparse header shares the flag with another layout
                raise InvalidImage("a sparse ('S') member outside the GNU tar format")
            kind = "file"
            if block[482] != 0:  # its map continues in extension headers before the data
                self._sparse_ext, self._sparse_data = True, padded
                return TarEntry(name, kind, size, linkname, _number(block[100:108]))
        if kind == "file" and typeflag == b"\0" and name.endswith("/"):
            # V7 archives mark directories by the trailing slash. Only V7's type: a '0'
            # member named "d/" is a file with data to Go (and containerd), and read as a
            # directory its data was read as headers
            kind = "dir"
        if kind == "dir" and len(name) > 1:
            name = name.rstrip("/")
        if kind != "file":
            # Links, directories, devices and FIFOs carry no data, whatever the size field
            # says (what tarfile and GNU tar do).
            size = padded = 0
        self._skip = padded
        return TarEntry(name, kind, size, linkname, _number(block[100:108]))

    def _finish_meta(self) -> None:
        assert self._collect is not None
        data = bytes(self._collect[: self._meta_size])  # the rest is block padding
        self._collect = None
        if self._meta_kind == b"x":
            self._pax = _pax_records(data)
        elif self._meta_kind == b"g":
            # Checked, then ignored: Go's archive/tar applies a global header to no member
            # and containerd skips it. Applied (as POSIX says), a global "path" renamed every
            # later member for us alone, hiding the image's files from the audit.
            _pax_records(data)
        elif self._meta_kind == b"L":
            self._long_name = _text(data)
        else:
            self._long_link = _text(data)
