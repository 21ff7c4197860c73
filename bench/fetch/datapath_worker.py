"""One data-path candidate reading one object through HTTP ranged GETs with ``streams``
threads, as bench/fetch/datapath.py runs it (a fresh process each; CPU is this process's).

    python datapath_worker.py MODE URL SIZE DEST STREAMS CHUNK

MODE: ``recv-pwrite`` (recv_into one reusable buffer a stream, CRC-32C on it, pwrite) or
``recv-mmap`` (recv_into the destination file's pages through mmap, CRC-32C on them: the bytes
cross user space once). Plain HTTP/1.1 over sockets: a prototype to measure, not a client.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from awscrt import checksums as crt


def _get(host: str, port: int, target: str, start: int, length: int, into: memoryview) -> int:
    with socket.create_connection((host, port)) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nRange: bytes={start}-"
            f"{start + length - 1}\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            more = s.recv(65536)
            if not more:
                raise RuntimeError("connection closed in headers")
            head += more
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 206 " not in status.split(b"\r\n", 1)[0]:
            raise RuntimeError(status.split(b"\r\n", 1)[0].decode())
        into[: len(rest)] = rest
        got = len(rest)
        lowat = int(os.environ.get("DATAPATH_RCVLOWAT", "0"))
        waitall = int(os.environ.get("DATAPATH_WAITALL", "0"))
        if waitall:
            # blocking socket, the kernel waits for each 1 MiB (SO_RCVTIMEO bounds a stall)
            s.settimeout(None)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 20, 0))
            while got < length:
                n = s.recv_into(into[got:], min(waitall, length - got), socket.MSG_WAITALL)
                if not n:
                    raise RuntimeError("short body")
                got += n
        while got < length:
            if lowat:
                # wake when this much has arrived, not per packet (Linux TCP honours it)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(lowat, length - got))
            n = s.recv_into(into[got:], length - got)
            if not n:
                raise RuntimeError("short body")
            got += n
    return crt.crc32c(into[:length])


def main() -> int:
    mode, url, size_s, dest, streams_s, chunk_s = sys.argv[1:7]
    size, streams, chunk = int(size_s), int(streams_s), int(chunk_s)
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    target = u.path + (f"?{u.query}" if u.query else "")
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    starts = range(0, size, chunk)
    if mode == "recv-mmap":
        mm = mmap.mmap(fd, size)
        view = memoryview(mm)

        def one(start: int) -> int:
            n = min(chunk, size - start)
            return _get(host, port, target, start, n, view[start : start + n])

        with ThreadPoolExecutor(streams) as ex:
            list(ex.map(one, starts))
        view.release()
        mm.close()
    elif mode == "recv-pwrite":
        local = threading.local()

        def one(start: int) -> int:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = memoryview(bytearray(chunk))
            n = min(chunk, size - start)
            crc = _get(host, port, target, start, n, buf)
            os.pwrite(fd, buf[:n], start)
            return crc

        with ThreadPoolExecutor(streams) as ex:
            list(ex.map(one, starts))
    else:
        raise SystemExit(f"unknown mode {mode}")
    os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
