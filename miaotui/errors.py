"""The errors miaotui reports to users, each with the exit status the CLI gives it."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries raise pages), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class MiaotuiError(Exception):
    """A failure worth one line to the user; `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(MiaotuiError):
    """Bad usage or bad input (a config, a file, a tensor): exit status 2."""

    exit_code = 2


class CheckFailed(MiaotuiError):
    """A check ran and its bar was missed (parity, accuracy): exit status 1."""

    exit_code = 1
