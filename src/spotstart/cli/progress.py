"""Rendering of fetch progress: a rich bar on a TTY (bytes, rate, ETA, files), nothing when
output is for machines."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def _plain(text: str) -> str:
    """Text from outside (an object name a bucket's writer chose, a peer's or a server's
    answer) shown as itself: no rich markup (``x[/dim]y`` raised MarkupError, exit 1, after
    the bytes landed) and no control character (an escape sequence would drive the
    operator's terminal, a newline forge a line)."""
    return escape("".join(c if c.isprintable() else "?" for c in text))


class RichProgress:
    """A :class:`spotstart.fetch.ProgressListener` drawing one bar for the whole fetch."""

    def __init__(self, console: Console, label: str) -> None:
        self.console = console
        self.label = label
        self._files_total = 0
        self._files_done = 0
        self._retries = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[files]}"),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def _files(self) -> str:
        retries = f" · {self._retries} retries" if self._retries else ""
        return f"{self._files_done}/{self._files_total} files{retries}"

    def on_start(self, *, files_total: int, bytes_total: int, bytes_done: int) -> None:
        self._files_total = files_total
        self._task = self._progress.add_task(
            self.label, total=bytes_total, completed=bytes_done, files=self._files()
        )

    def on_bytes(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def on_retry(self, what: str, error: str, delay_s: float) -> None:
        self._retries += 1
        if self._task is not None:
            self._progress.update(self._task, files=self._files())

    def on_file_done(self, rel: str, *, cached: bool) -> None:
        self._files_done += 1
        if self._task is not None:
            self._progress.update(self._task, files=self._files())
        if cached:
            self.console.print(f"  [dim]{_plain(rel)}: already current, skipped[/dim]")

    def on_message(self, text: str) -> None:
        self.console.print(f"  {_plain(text)}")


class LineProgress:
    """For non-TTY stderr: a line per notable event, no bar."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def on_start(self, *, files_total: int, bytes_total: int, bytes_done: int) -> None:
        self.console.print(f"fetching {files_total} files, {bytes_total / 1e6:.1f} MB")

    def on_bytes(self, n: int) -> None:
        return None

    def on_retry(self, what: str, error: str, delay_s: float) -> None:
        self.console.print(f"retry in {delay_s:.2f}s: {_plain(error)}")

    def on_file_done(self, rel: str, *, cached: bool) -> None:
        self.console.print(f"{_plain(rel)}: {'already current, skipped' if cached else 'done'}")

    def on_message(self, text: str) -> None:
        self.console.print(_plain(text))
