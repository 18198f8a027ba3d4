"""A live progress display for `lab bench` over several profiles, on stderr.

The bench reports through two plain callbacks (a progress message, a finished
result); this module turns them into a rich display: one bar over the profiles,
the current step beside it, and a line per step and per result above it, so
that the history stays readable when stderr is not a terminal.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from lab.report import label, logged_packets, rtt_pair


class BenchDisplay:
    """`progress` and `finished` are the callbacks `lab.bench.bench_profiles` takes."""

    def __init__(self, console: Console, profiles: list[str]) -> None:
        self.console = console
        self.live = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[profile]}[/]"),
                             BarColumn(bar_width=20), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("{task.description}"),
                             console=console, transient=False)
        self.profiles = profiles
        self.done = 0
        self.task = self.live.add_task("starting", total=len(profiles), profile=profiles[0])

    def __enter__(self) -> BenchDisplay:
        self.live.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.live.stop()

    def progress(self, message: str) -> None:
        self.live.console.print(f"[dim]lab:[/] {message}")
        self.live.update(self.task, description=message)

    def finished(self, result: dict[str, Any]) -> None:
        name = label(result)
        if "error" in result:
            line = f"[red]{name}: failed[/] ({result['error']})"
        else:
            logged = (f"{logged_packets(result)} packets logged" if result["logged"]
                      else "not logged")
            ceiling = result.get("tunnel_to_ceiling")
            line = (f"[green]{name}[/]: [bold]{result['receiver_mbps']:.1f} Mbit/s[/]"
                    + (f" ({ceiling:.0%} of the database's ceiling)" if ceiling else "")
                    + f", RTT p50/p99 idle {rtt_pair(result, 'rtt_idle_ms')} ms, under load "
                    f"{rtt_pair(result, 'rtt_loaded_ms')} ms, {logged}")
        self.live.console.print(line)
        self.done += 1
        upcoming = self.profiles[self.done] if self.done < len(self.profiles) else "done"
        self.live.update(self.task, completed=self.done, profile=upcoming)
