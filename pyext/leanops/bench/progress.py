"""Progress while a sweep runs: a rich progress bar when `rich` is installed and the output is a
terminal, otherwise one plain line per case (what CI logs and pipes see)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class PlainProgress:
    """One line per event through `write` (print by default)."""

    def __init__(self, write: Callable[[str], None] | None = None):
        self.write = write or (lambda text: print(text, flush=True))
        self.total = 0
        self.count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self, total: int, title: str) -> None:
        self.total, self.count = total, 0
        self.write(f"{title}: {total} case(s)")

    def advance(self, label: str, result: str) -> None:
        self.count += 1
        width = len(str(self.total))
        self.write(f"[{self.count:>{width}}/{self.total}] {label}  {result}")

    def log(self, text: str) -> None:
        self.write(text)

    def close(self) -> None:
        pass


class RichProgress(PlainProgress):
    """A rich progress bar; finished cases and messages are printed above it."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=False, highlight=False)
        super().__init__(lambda text: self.console.print(text, markup=False, highlight=False, soft_wrap=True))
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=self.console, transient=True)
        self._task = None
        self._bar.start()

    def start(self, total: int, title: str) -> None:
        super().start(total, title)
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(title, total=total)

    def advance(self, label: str, result: str) -> None:
        super().advance(label, result)
        self._bar.update(self._task, advance=1, description=label.split("  ")[0][:60])

    def close(self) -> None:
        self._bar.stop()


def make_progress(kind: str = "auto") -> PlainProgress:
    """kind: "auto" (rich on a terminal when installed, else plain), "rich", "plain"."""
    if kind == "plain":
        return PlainProgress()
    if kind == "auto" and not sys.stdout.isatty():
        return PlainProgress()
    try:
        return RichProgress()
    except ImportError:
        if kind == "rich":
            raise SystemExit("leanops: --progress rich needs the rich package (pip install rich)") from None
        return PlainProgress()


def as_progress(progress) -> PlainProgress:
    """Accept a progress object or a plain `print`-like callable (the older interface)."""
    if isinstance(progress, PlainProgress):
        return progress
    return PlainProgress(progress)
