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
    # descriptions and notes hold names from recipes and folders (`exp[v2]`, `crane [/], bird`): plain text
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(bar_width=10), MofNCompleteColumn(),
                    RateColumn(unit), TimeRemainingColumn(compact=True), TextColumn("{task.fields[info]}", markup=False),
                    disable=disable, console=console)


class PlainProgress:
    """Progress as plain lines, for a log file or a pipe (where a bar is redrawn as one squeezed line per
    task): one line when a task's info is set (the end of an epoch) and one per step record (every
    `log_every` steps). The same add_task / advance / update calls as rich's Progress."""

    def __init__(self, console: Console):
        self.console, self.tasks, self.current = console, {}, None

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, *, total: float, info: str = "") -> int:
        import time
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "done": 0, "start": time.perf_counter()}
        self.current = task
        return task

    def advance(self, task: int, n: float) -> None:
        self.tasks[task]["done"] += n

    def update(self, task: int, *, info: str = "") -> None:
        import time
        t = self.tasks[task]
        seconds = time.perf_counter() - t["start"]
        self._line(f"{t['description']}: {t['done']:,.0f}/{t['total']:,.0f} in {seconds:.1f} s "
                   f"({t['done'] / max(seconds, 1e-9):,.0f} img/s) {info}".rstrip())

    def step_record(self, record: dict) -> None:
        """A metrics.jsonl step record (runlog.MetricsLog mirror), as a line of the task in progress."""
        if record.get("kind") != "step" or self.current is None:
            return
        t = self.tasks[self.current]
        self._line(f"{t['description']} step {record['step'] + 1}: loss {record['loss']:.3f} "
                   f"lr {record['lr']:.4g} {record['img_s']:,.0f} img/s")

    def _line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)


def run_progress(*, enabled: bool, console: Console) -> Progress | PlainProgress:
    """The progress display of a run: bars on a terminal, plain lines otherwise, nothing when disabled."""
    if enabled and not console.is_terminal:
        return PlainProgress(console)
    return progress_bar(disable=not enabled, console=console)
