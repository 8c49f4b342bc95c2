"""The Ansible role (contrib/ansible/roles/ksmpolicy) run for real: ansible-core from Debian inside
a Debian 12 container with systemd as PID 1 (tests/lifecycle/container.py), the role
bind-mounted read-only, the playbook run there with `-c local` against the .deb `make deb`
built. In order: a wrong variable refused by the argument spec before any task; `--check` on a
fresh host (nothing done); install with the daemon left stopped (doctor's own failing line fails
the play); the daemon started; a second run that changes nothing; a policy change shown by
`--check --diff` and then made (the daemon reloads it, same process); a policy `ksmpolicy check`
refuses never lands; a policy from a file; `absent` purges the package and the knobs are as the
daemon found them. On Debian 12 (ansible-core 2.14, the oldest the role supports) with the
package from the controller (`ksmpolicy_deb_src`), and on Debian 13 (ansible-core 2.19) with the
package from a URL (`ksmpolicy_deb_url`, served on loopback by the test). Root."""

from __future__ import annotations

import functools
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, RealKsm, saved_knobs
from tests.lifecycle.container import Container
from tests.lifecycle.test_lifecycle import UNIT, Daemon, deb, wait_for  # noqa: F401 (deb: a fixture)

pytestmark = [pytest.mark.root, pytest.mark.kernel]
ROLES = REPO / "contrib/ansible/roles"
PLAY = """- name: ksmpolicy
  hosts: all
  gather_facts: false
  roles:
    - ksmpolicy
"""
POLICY = "/etc/ksmpolicy/policy.yaml"
MINIMAL = "version: 1\ndefault: exclude\n"
FOUND = {"run": 0, "pages_to_scan": 123, "sleep_millisecs": 45}
RECAP = re.compile(
    r"^localhost\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


def policy(default: str) -> dict[str, object]:
    return {
        "version": 1,
        "enforcement": "warn",
        "live": True,
        "default": default,
        "rules": [
            {"name": "databases", "match": {"tags": ["database"]}, "action": "exclude"},
        ],
    }


# Where each release's play takes the package from: the controller, or a URL.
SOURCE = {"bookworm": "ksmpolicy_deb_src", "trixie": "ksmpolicy_deb_url"}


@pytest.fixture
def container(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    with Container.booted(request.param, tmp_path / "container", [f"{ROLES}:/srv/roles"]) as box:
        yield box


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:  # apt's requests are not the test's output
        pass


@pytest.fixture
def deb_url(deb: Path) -> Iterator[str]:  # noqa: F811
    """The .deb over HTTP on loopback (the container shares the host's network)."""
    handler = functools.partial(Quiet, directory=str(deb.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{deb.name}"
    finally:
        server.shutdown()
        server.server_close()


class Play:
    """ansible-playbook inside the container, with the variables as a JSON file."""

    def __init__(self, box: Container, source: dict[str, str]) -> None:
        self.box = box
        self.source = source  # the variable that names the package, and its value
        (box.root / "root/site.yml").write_text(PLAY)

    def run(self, *options: str, **variables: object) -> tuple[int, str, dict[str, int]]:
        given = {**self.source, **variables}
        (self.box.root / "root/vars.json").write_text(json.dumps(given))
        result = self.box.run(
            *("HOME=/root", "ANSIBLE_ROLES_PATH=/srv/roles", "ANSIBLE_NOCOLOR=1"),
            *("ANSIBLE_PYTHON_INTERPRETER=/usr/bin/python3", "ANSIBLE_RETRY_FILES_ENABLED=0"),
            *("ansible-playbook", "-c", "local", "-i", "localhost,", "-e", "@/root/vars.json"),
            *options,
            "/root/site.yml",
            check=False,
            timeout=180,
        )
        output = result.stdout + result.stderr
        recap = RECAP.search(output)
        counts = {k: int(v) for k, v in recap.groupdict().items()} if recap else {}
        return result.returncode, output, counts

    def policy_text(self) -> str:
        return (self.box.root / POLICY.lstrip("/")).read_text()


@pytest.mark.parametrize("container", ["bookworm", "trixie"], indirect=True)
def test_role(deb: Path, deb_url: str, container: Container, real_ksm: RealKsm) -> None:  # noqa: F811
    box, daemon = container, Daemon(container)
    source = SOURCE[box.release]
    for name, value in FOUND.items():
        real_ksm.write(name, value)
    found = saved_knobs()
    (box.root / "root" / deb.name).write_bytes(deb.read_bytes())
    box.run("apt-get", "update", "-qq")
    box.run(
        *("apt-get", "install", "-y", "-qq", "--no-install-recommends"),
        *("ansible-core", "python3-apt"),
        timeout=600,
    )
    play = Play(box, {source: deb_url if source == "ksmpolicy_deb_url" else f"/root/{deb.name}"})

    # A wrong variable: refused by the argument spec, with the choices, before any task runs.
    rc, out, counts = play.run(ksmpolicy_state="maybe")
    assert rc != 0 and counts["failed"] == 1, out
    assert "ksmpolicy_state" in out and "maybe" in out and "present, absent" in out, out
    assert box.run("dpkg-query", "-W", "ksmpolicy", check=False).returncode != 0
    # Two package sources: the role's own check says which were given.
    other = {"ksmpolicy_deb_src": "/root/k.deb", "ksmpolicy_deb_url": "http://example.invalid/k"}
    del other[source]
    rc, out, counts = play.run(**other)
    assert rc != 0 and "given: ksmpolicy_deb_src, ksmpolicy_deb_url" in out, out

    # --check --diff on a fresh host: what it would do, and nothing done.
    rc, out, counts = play.run("--check", "--diff", ksmpolicy_policy=policy("merge"))
    assert rc == 0 and counts["changed"] >= 2, out
    assert box.run("dpkg-query", "-W", "ksmpolicy", check=False).returncode != 0
    for untouched in ("etc/ksmpolicy", "var/cache/ksmpolicy-ansible"):
        assert not (box.root / untouched).exists(), untouched

    # Install with the daemon left stopped: doctor's own failing line fails the play.
    rc, out, counts = play.run(ksmpolicy_policy=policy("merge"), ksmpolicy_service_started=False)
    assert rc != 0 and counts["failed"] == 1, out
    assert "the ksmpolicy daemon is not running" in out, out
    assert "fix: systemctl enable --now ksmpolicy" in out, out
    assert box.run("dpkg-query", "-W", "-f=${Status}", "ksmpolicy").stdout == (
        "install ok installed"
    )
    assert not daemon.active()
    assert "default: merge" in play.policy_text()
    assert play.policy_text().startswith("# Ansible managed")

    # The daemon started for real; doctor is satisfied.
    rc, out, counts = play.run(ksmpolicy_policy=policy("merge"))
    assert rc == 0 and counts["changed"] >= 1, out
    assert daemon.active()
    pid = box.host_pid(daemon.main_pid())
    assert wait_for(lambda: daemon.version() != "", 10), "the daemon shows no sign of life"
    assert box.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"

    # On a configured host: no change.
    start = time.monotonic()
    rc, out, counts = play.run(ksmpolicy_policy=policy("merge"))
    took = time.monotonic() - start
    assert rc == 0 and counts["changed"] == 0, out
    assert took < 30, f"a run on a configured host took {took:.1f} s"
    print(f"a run on a configured host: {took:.1f} s")

    # --check --diff shows the policy's diff and changes nothing.
    before = play.policy_text()
    rc, out, counts = play.run("--check", "--diff", ksmpolicy_policy=policy("exclude"))
    # Changed: the policy, and the reload it would notify.
    assert rc == 0 and counts["changed"] == 2, out
    assert "-default: merge" in out and "+default: exclude" in out, out
    assert play.policy_text() == before
    assert box.host_pid(daemon.main_pid()) == pid
    assert "reloaded policy" not in box.run("journalctl", "-u", UNIT, "-o", "cat").stdout

    # For real: the policy replaced, the daemon reloads it (SIGHUP: the same process).
    rc, out, counts = play.run(ksmpolicy_policy=policy("exclude"))
    assert rc == 0 and counts["changed"] == 2, out
    assert "default: exclude" in play.policy_text()
    assert box.host_pid(daemon.main_pid()) == pid, "the daemon was restarted, not reloaded"
    journal = box.run("journalctl", "-u", UNIT, "-o", "cat").stdout
    assert f"reloaded policy {POLICY}" in journal, journal

    # A policy `ksmpolicy check` refuses never lands: the play fails with its message.
    before = play.policy_text()
    rc, out, counts = play.run(ksmpolicy_policy=policy("sometimes"))
    assert rc != 0 and counts["failed"] == 1, out
    assert "default: expected one of merge, exclude, got 'sometimes'" in out, out
    assert play.policy_text() == before
    assert daemon.active()

    # From a file on the controller (here the container itself): copied as it is.
    (box.root / "root/policy-file.yaml").write_text(MINIMAL)
    rc, out, counts = play.run(ksmpolicy_policy_src="/root/policy-file.yaml")
    assert rc == 0 and counts["changed"] == 2, out
    assert play.policy_text() == MINIMAL

    # absent: purged; the daemon stopped and put the knobs back; the hook and the copy gone.
    rc, out, counts = play.run(ksmpolicy_state="absent")
    copied = source == "ksmpolicy_deb_src"  # a package from a URL leaves no copy to remove
    assert rc == 0 and counts["changed"] == (2 if copied else 1), out
    assert box.run("dpkg-query", "-W", "ksmpolicy", check=False).returncode != 0
    assert not Path(f"/proc/{pid}").exists(), "the daemon outlived the package"
    assert saved_knobs() == found
    for gone in (POLICY, "/etc/libvirt/hooks/qemu.d/ksmpolicy", "/var/cache/ksmpolicy-ansible"):
        assert not (box.root / gone.lstrip("/")).exists(), gone
    rc, out, counts = play.run(ksmpolicy_state="absent")
    assert rc == 0 and counts["changed"] == 0, out
