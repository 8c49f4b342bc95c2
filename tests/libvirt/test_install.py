"""What an installer writes into a hook must work from where the hypervisor runs it: an
interpreter the kernel can run from a `#!` line, and paths that do not depend on the
installer's working directory (libvirtd and Proxmox run hooks from `/`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmpolicy.cli.main import cli
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.hookshim import absolute_options, shebang
from ksmpolicy.libvirt.install import install
from ksmpolicy.paths import HostPaths
from ksmpolicy.proxmox.hookscript import install_hookscript
from tests.conftest import REPO

DATABASE_XML = (REPO / "tests/data/libvirt/ksm-tagged-database.xml").read_bytes()
POLICY = """\
version: 1
enforcement: block
rules:
  - name: databases never merge
    match: {tags: [database]}
    action: exclude
"""


def interpreter_at(directory: Path) -> str:
    """This interpreter under another path (a symlink: the kernel follows it)."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "python3"
    link.symlink_to(sys.executable)
    return str(link)


def unrunnable(tmp_path: Path) -> dict[str, str]:
    return {
        "space": interpreter_at(tmp_path / "my venv/bin"),
        "tab": interpreter_at(tmp_path / "a\tb"),
        "newline": interpreter_at(tmp_path / "a\nb"),
        "too long": interpreter_at(tmp_path / ("d" * 200) / ("e" * 60)),
        "relative": "venv/bin/python3",
        "missing": str(tmp_path / "no/such/python3"),
    }


@pytest.mark.parametrize("case", ["space", "tab", "newline", "too long", "relative", "missing"])
def test_an_interpreter_no_hook_could_run_is_refused_at_install(tmp_path: Path, case: str) -> None:
    python = unrunnable(tmp_path)[case]
    paths = HostPaths(tmp_path / "root")
    with pytest.raises(KsmPolicyError, match="would fail every VM start; install ksmpolicy") as e:
        install(paths, python=python)
    assert "\n" not in str(e.value) and "\t" not in str(e.value)  # the path is quoted
    assert not (tmp_path / "root/etc/libvirt/hooks/qemu.d/ksmpolicy").exists()
    storage = tmp_path / "root/etc/pve/storage.cfg"
    storage.parent.mkdir(parents=True)
    storage.write_text(f"dir: local\n\tpath {tmp_path / 'vz'}\n\tcontent snippets\n")
    with pytest.raises(KsmPolicyError, match="would fail every VM start"):
        install_hookscript(paths, "local", python)
    assert not (tmp_path / "vz/snippets/ksmpolicy-hook").exists()


def test_the_line_length_the_running_kernel_reads() -> None:
    python = "/" + "p" * 150
    assert len(f"#!{python} -IS") > 127
    with pytest.raises(KsmPolicyError, match="longer than the 127 bytes"):
        shebang(python, "4.19.0-27-amd64")
    with pytest.raises(KsmPolicyError, match="not an executable file"):  # only the length fits
        shebang(python, "6.1.0-18-amd64")
    with pytest.raises(KsmPolicyError, match="longer than the 255 bytes"):
        shebang("/" + "p" * 260, "6.1.0-18-amd64")


def test_a_long_interpreter_path_that_fits_still_runs(tmp_path: Path) -> None:
    python = interpreter_at(tmp_path / ("d" * max(1, 120 - len(str(tmp_path)) - 16)))
    path = install(HostPaths(tmp_path / "root"), python=python)
    assert path.read_text().startswith(f"#!{python} -IS\n")


def test_relative_paths_in_a_hook_are_made_absolute() -> None:
    here = str(Path.cwd())
    assert absolute_options(["--policy", "p.yaml", "--run-dir", "run", "--qm", "qm"]) == [
        "--policy",
        f"{here}/p.yaml",
        "--run-dir",
        f"{here}/run",
        "--qm",
        "qm",  # a command name: found on PATH, as Proxmox's qm is
    ]
    assert absolute_options(["--qm", "./bin/qm", "--root", "."]) == [
        "--qm",
        f"{here}/bin/qm",
        "--root",
        here,
    ]


def test_install_hook_policy_relative_reads_that_file_from_slash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`install libvirt --hook-policy policy.yaml` in the policy's directory, then the hook run
    the way libvirtd runs it (from /): it reads that policy and refuses the database VM."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "policy.yaml").chmod(0o644)
    root = tmp_path / "root"
    result = CliRunner().invoke(
        cli,
        [
            "install",
            "libvirt",
            "--hook-policy",
            "policy.yaml",
            "--run-dir",
            "run",
            "--root",
            str(root),
        ],
    )
    assert result.exit_code == 0, result.output
    hook = root / "etc/libvirt/hooks/qemu.d/ksmpolicy"
    assert repr(str(tmp_path / "policy.yaml")) in hook.read_text()
    run = subprocess.run(
        [str(hook), "pg-primary", "prepare", "begin", "-"],
        input=DATABASE_XML,
        capture_output=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        timeout=20,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.decode().startswith('ksmpolicy: "pg-primary" must not share memory')
    assert (tmp_path / "run").is_dir()  # the run dir given relative, used where it was meant
