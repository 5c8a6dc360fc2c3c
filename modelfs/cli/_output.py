"""How the CLI talks to people and pipes: progress bars on a terminal, quiet in a pipe,
JSON when asked, one-line errors.

Progress goes to stderr, results to stdout, so ``modelfs list --json | jq`` works.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console


def _console() -> Console:
    from rich.console import Console  # rich costs ~100 ms to import; only bars need it
    return Console(stderr=True, highlight=False)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def table(rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to the widest cell; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def info(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


@contextmanager
def progress_bar(total: int | None, description: str, *, enabled: bool | None = None
                 ) -> Iterator[Callable[[int], None]]:
    """Yield a callback taking a byte count. Draws only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class BinaryRate(ProgressColumn):
        """Transfer rate in binary units (rich's own column is decimal)."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{human_size(int(speed))}/s" if speed else "?", style="progress.data.speed")

    # Binary units throughout, as `list` and `status` print sizes.
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True), BinaryRate(),
               TimeRemainingColumn())
    with Progress(*columns, console=_console(), transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n: prog.update(task, advance=n)
