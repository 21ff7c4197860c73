"""The one exception hierarchy of spotstart, and the CLI exit code of each leaf.

    SpotstartError                      exit 1  (unexpected; a bug or an unclassified failure)
    +-- UsageError                      exit 2  bad URL, bad flag, bad config
    +-- NotFound                        exit 3  bucket, object, prefix or file does not exist
    +-- AccessDenied                    exit 4  401/403 from the store
    |   +-- CredentialsNotFound         exit 4  no credentials anywhere in the cloud's chain
    +-- EndpointUnreachable             exit 5  DNS failure, connection refused, TLS failure
    +-- IntegrityError                  exit 6  checksum or size mismatch that survived refetching
    |   +-- ObjectChanged               exit 6  the object was replaced while being read
    +-- RetriesExceeded                 exit 7  transient errors (5xx, 429, resets) past the budget
    |   +-- TransferStalled             exit 7  no bytes for longer than the stall timeout
    +-- LocalIOError                    exit 8  the destination cannot be written
    |   +-- DiskFull                    exit 9  ENOSPC / EDQUOT on the destination
    |   +-- UnsafePath                  exit 8  a symlink, or a directory others may write, where
    |   |                                       spotstart creates files
    |   +-- DestinationBusy             exit 17 `fetch --no-wait`: another fetch is writing a
    |                                           file of this DEST
    +-- InvalidCheckpoint               exit 10 malformed checkpoint: header, offsets, dtype, index
    +-- ProtocolError                   exit 11 the server broke its protocol (a 200 to a ranged
                                                read, a listing that is not S3 XML)
    +-- InvalidImage                    exit 12 malformed container image: truncated tar, bad
    |                                           manifest JSON, a layer that is no tar
    +-- UnsupportedImage                exit 13 well-formed, but not an image we read: unknown
    |                                           media type, schema 1, encrypted layers
    +-- BudgetExceeded                  exit 14 `image audit` gate: waste over --max-waste-*
    +-- NotReady                        exit 15 `image profile`: the server exited or timed out
    |                                           before it was ready
    +-- NodeUnfit                       exit 16 `doctor`: a blocking problem on this node

Messages name the object, the cause and the fix, on one line.
"""

from __future__ import annotations


class SpotstartError(Exception):
    """Root of every error spotstart raises on purpose."""

    exit_code = 1


class UsageError(SpotstartError):
    """The request itself is wrong: a malformed URL, flag or config."""

    exit_code = 2


class NotFound(SpotstartError):
    """The bucket, object, prefix or local path does not exist."""

    exit_code = 3


class AccessDenied(SpotstartError):
    """The store refused the credentials it was given (401/403)."""

    exit_code = 4


class CredentialsNotFound(AccessDenied):
    """No credentials were found and the store does not allow anonymous reads."""


class EndpointUnreachable(SpotstartError):
    """The endpoint could not be reached at all: DNS, refused connection, TLS."""

    exit_code = 5


class IntegrityError(SpotstartError):
    """The bytes received do not match the object's size or checksum, even after refetching."""

    exit_code = 6


class ObjectChanged(IntegrityError):
    """The object's version changed while it was being read."""


class TransientError(SpotstartError):
    """A failure worth retrying (5xx, 429, reset, short body). Internal: retried, then wrapped.
    ``status`` is the HTTP status when there was one; ``throttled`` is True for the answers that
    ask a client to slow down (429, 503), which the concurrency controller acts on."""

    exit_code = 7

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status

    @property
    def throttled(self) -> bool:
        return self.status in (429, 503)


class RetriesExceeded(SpotstartError):
    """Transient failures continued past the retry budget; ``last`` is the final one."""

    exit_code = 7

    def __init__(self, message: str, last: BaseException | None = None) -> None:
        super().__init__(message)
        self.last = last


class TransferStalled(RetriesExceeded):
    """A stream delivered no bytes for longer than the stall timeout, on every attempt."""


class StallDetected(TransientError):
    """One stream stalled; internal, retried like any transient failure."""


class LocalIOError(SpotstartError):
    """The destination cannot be written (permissions, not a directory, I/O error)."""

    exit_code = 8


class DiskFull(LocalIOError):
    """The destination file system is out of space or quota."""

    exit_code = 9


class UnsafePath(LocalIOError):
    """A name spotstart would create or write resolves through a symlink, or lies in a
    directory that another user may write (see :mod:`spotstart.safefs`)."""


class InvalidCheckpoint(SpotstartError):
    """The checkpoint is malformed: header, offsets, dtype, index."""

    exit_code = 10


class ProtocolError(SpotstartError):
    """The server answered against its protocol's spec in a way retrying would not mend."""

    exit_code = 11


class InvalidImage(SpotstartError):
    """The container image is malformed: a truncated tar, broken JSON, a layer that is no tar."""

    exit_code = 12


class UnsupportedImage(SpotstartError):
    """The image is well-formed but not one we can read (unknown media type, schema 1)."""

    exit_code = 13


class BudgetExceeded(SpotstartError):
    """An audit found more waste than the CI gate allows (``--max-waste-bytes/-ratio``)."""

    exit_code = 14


class NotReady(SpotstartError):
    """The profiled server exited, or did not become ready in time."""

    exit_code = 15


class NodeUnfit(SpotstartError):
    """`doctor` found a blocking problem on this node (a ``fail`` verdict)."""

    exit_code = 16


class DestinationBusy(LocalIOError):
    """Another fetch is writing a file of this DEST, and this one was asked not to wait
    (``--no-wait``). Nothing of theirs was touched; rerun once it is done."""

    exit_code = 17


EXIT_CODES: dict[str, int] = {
    "ok": 0,
    "error": SpotstartError.exit_code,
    "usage": UsageError.exit_code,
    "not_found": NotFound.exit_code,
    "access_denied": AccessDenied.exit_code,
    "unreachable": EndpointUnreachable.exit_code,
    "integrity": IntegrityError.exit_code,
    "retries_exceeded": RetriesExceeded.exit_code,
    "local_io": LocalIOError.exit_code,
    "disk_full": DiskFull.exit_code,
    "invalid_checkpoint": InvalidCheckpoint.exit_code,
    "protocol": ProtocolError.exit_code,
    "invalid_image": InvalidImage.exit_code,
    "unsupported_image": UnsupportedImage.exit_code,
    "budget_exceeded": BudgetExceeded.exit_code,
    "not_ready": NotReady.exit_code,
    "node_unfit": NodeUnfit.exit_code,
    "busy": DestinationBusy.exit_code,
    "interrupted": 130,
}
