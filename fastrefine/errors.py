"""Errors that the CLI turns into one clear line and an exit code.

UsageError (exit 2): the user asked for something malformed (a bad recipe key, a missing folder).
RunError (exit 1): something failed while running (a NaN loss, a backend that cannot start).
"""


class FastRefineError(Exception):
    exit_code = 1


class UsageError(FastRefineError):
    exit_code = 2


class RunError(FastRefineError):
    exit_code = 1
