"""ansible-lint (the `production` profile, contrib/ansible/.ansible-lint) finds nothing in the
role and its example playbook; and the same run does find a fault put into a copy of the role,
so a clean result means the files were read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

ANSIBLE = REPO / "contrib/ansible"
LINT = Path(sys.executable).parent / "ansible-lint"


def lint(where: Path, home: Path) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "HOME": str(home),  # its caches, not the user's
        "PATH": f"{LINT.parent}:{os.environ.get('PATH', '')}",
        "ANSIBLE_ROLES_PATH": str(where / "roles"),
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [str(LINT), "--offline", "--nocolor", "roles/ksmpolicy", "examples"],
        cwd=where,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_role_is_lint_clean(tmp_path: Path) -> None:
    result = lint(ANSIBLE, tmp_path / "home")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stderr, result.stderr


def test_a_fault_in_the_role_is_found(tmp_path: Path) -> None:
    copy = tmp_path / "ansible"
    shutil.copytree(ANSIBLE, copy)
    tasks = copy / "roles/ksmpolicy/tasks/service.yml"
    tasks.write_text(tasks.read_text() + "\n- ansible.builtin.command: systemctl daemon-reload\n")
    result = lint(copy, tmp_path / "home")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "name[missing]" in result.stdout + result.stderr, result.stdout + result.stderr
