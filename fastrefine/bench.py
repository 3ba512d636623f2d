"""`fastrefine bench`: filled in by the benchmark work (issue 6)."""


def register(app, *, handle_errors, console) -> None:
    del app, handle_errors, console
