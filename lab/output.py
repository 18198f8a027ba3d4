"""Where the `lab` command writes: progress on stderr, one line each."""

from __future__ import annotations

from rich.console import Console

# soft_wrap: a progress line stays one line in a log or a pipe, whatever its length
err = Console(stderr=True, highlight=False, soft_wrap=True)


def progress(message: str) -> None:
    err.print(f"[dim]lab:[/] {message}")
