"""`promptier <command> --help` as a user reads it in an 80-column terminal."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from classifier.cli import command_line


@pytest.mark.parametrize(("command", "option"), [("serve", "--handshake-timeout"), ("dispatch", "--config"),
                                                 ("label", "--id-column"), ("train", "--holdout-category")])
def test_help_names_every_option_whole_at_80_columns(command: str, option: str) -> None:
    """Rich's boxed help cut long option names short (`--handshake-time…`) and kept the docstrings' line
    breaks mid-sentence; click's help wraps each option's text beside its whole name."""
    result = CliRunner().invoke(command_line([command, "--help"]), [command, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert option in result.output and "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
