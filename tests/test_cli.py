"""The command line: entry point, --help, and the exit code for no command."""

import subprocess
import sys

from sparse_upcycle import cli


def test_module_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "sparse_upcycle", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "sparse-upcycle" in out.stdout and "Mixture-of-Experts" in out.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: sparse-upcycle" in capsys.readouterr().err
