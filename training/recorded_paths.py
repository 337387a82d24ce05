"""Paths as a model card shows them: never absolute, so that it names no directory of the machine that
trained the model, and reads as the command would be typed where the card was written."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path


def recorded_path(path: str | Path) -> str:
    """`path` as given when it is relative; an absolute one relative to the working directory (with `..`
    where it lies outside it), which is how a command typed there would name it."""
    text = str(path)
    if not os.path.isabs(text):
        return text
    try:
        return os.path.relpath(text)
    except ValueError:  # another drive than the working directory's (Windows): no relative form exists
        return Path(text).name


def recorded_paths(value: object) -> object:
    """`value`, a path or a list of them (or other plain data of paths), with each absolute one made relative."""
    if isinstance(value, dict):
        return {key: recorded_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [recorded_paths(item) for item in value]
    return recorded_path(value) if isinstance(value, str) else value


def recorded_command_line(command: str) -> str:
    """A recorded shell command with each absolute path among its arguments made relative."""
    try:
        return shlex.join(recorded_command(shlex.split(command)))
    except ValueError:  # not a shell line (unbalanced quotes): shown as recorded
        return command


def recorded_command(arguments: Sequence[str]) -> list[str]:
    """A command's arguments with each absolute path made relative, alone or after `--option=`."""
    recorded = []
    for argument in arguments:
        option, equals, value = argument.partition("=")
        if equals and option.startswith("-"):
            recorded.append(f"{option}={recorded_path(value)}")
        else:
            recorded.append(recorded_path(argument))
    return recorded
