"""One look for every progress bar: description, bar, done/total, images/s, elapsed, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, from rich's own moving estimate."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"- {self.unit}" if speed is None else f"{speed:,.0f} {self.unit}", style="progress.data.speed")


def progress_bar(*, disable: bool = False, unit: str = "img/s", console: Console | None = None) -> Progress:
    # compact enough for an 80-column terminal: what, how far, how fast, how long to go, and a note
    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=10), MofNCompleteColumn(),
                    RateColumn(unit), TimeRemainingColumn(compact=True), TextColumn("{task.fields[info]}"),
                    disable=disable, console=console)
