"""Hostile input, class by class, against the real hooks and commands run as processes.

A guest controls its disks' contents (the first sector of a raw disk included) and the strings
it shows; a local user may own directories on a path, plant FIFOs and symlinks, and slow a
filesystem down. Every case runs the way libvirt or Proxmox runs the hook (argv, stdin, a time
limit), in each enforcement mode, and checks:

* the exit status per mode (only `block` ever refuses a start);
* at most one line on stderr, never a traceback;
* nothing written outside the hook's own runtime directory;
* the decision is the one the same VM gets without the hostile part (the baseline).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ksmpolicy.libvirt.install import shim
from tests.conftest import AS_NOBODY, IS_ROOT, REPO, replace_policy

MODES = ("off", "warn", "block")
LIMIT = 15.0  # seconds a case may take at most; the hook's own deadline is set to 1 s


@dataclass
class Outcome:
    status: int
    lines: list[str]
    seconds: float
    written: set[str]


def qcow2(path: Path, backing: str | None = None, fmt: str | None = "qcow2") -> None:
    """A qcow2 v3 header as qemu-img writes it (backing name, backing_fmt extension)."""
    name = (backing or "").encode()
    ext = b""
    if backing and fmt:
        ext += struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt.encode().ljust(8, b"\0")
    ext += struct.pack(">II", 0, 0)
    head = b"QFI\xfb" + struct.pack(">IQII", 3, (112 + len(ext)) if backing else 0, len(name), 16)
    header = (head.ljust(100, b"\0") + struct.pack(">I", 112)).ljust(112, b"\0")
    path.write_bytes(header + ext + name)


def forged_raw(path: Path, names: str) -> None:
    """What a guest can write into the first sector of its raw disk: a qcow2 header naming
    another image, then data."""
    qcow2(path, names, "qcow2")
    with path.open("ab") as disk:
        disk.write(os.urandom(4096))


def domain(name: str, disk: str = "", extra: str = "") -> bytes:
    return (
        f"<domain type='kvm'>\n  <name>{name}</name>\n"
        "  <uuid>6e6b7d53-8d7a-4c1e-9f0a-1b2c3d4e5f60</uuid>\n"
        f"  <memory unit='MiB'>512</memory>\n{extra}  <devices>\n{disk}  </devices>\n"
        "</domain>\n"
    ).encode()


def disk(source: str, driver: str | None, chain: str = "") -> str:
    kind = f"<driver name='qemu' type='{driver}'/>" if driver else ""
    return (
        f"    <disk type='file' device='disk'>{kind}<source file='{source}'/>{chain}"
        "<target dev='vda' bus='virtio'/></disk>\n"
    )


class Host:
    """A temporary tree with a policy, the installed hook shim, and a runtime directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.images.mkdir()
        self.provider = root / "provider"
        self.provider.mkdir()
        self.run = root / "run"
        self.policy = root / "policy.yaml"
        self.hook = root / "qemu"
        self.hook.write_text(shim(sys.executable, str(self.policy), str(self.run)))
        self.hook.chmod(0o755)

    def write_policy(self, mode: str, text: str | None = None) -> None:
        body = (
            text
            if text is not None
            else (
                f"version: 1\nenforcement: {mode}\ndefault: exclude\n"
                f"groups:\n  provider: {{images: ['{self.provider}/*']}}\n"
                "rules:\n  - name: provider images\n    match: {groups: [provider]}\n"
                "    action: merge\n"
            )
        )
        replace_policy(self.policy, body)

    def files(self) -> set[str]:
        """Every file under the tree with its mtime (a hanging filesystem must never be
        mounted inside it: this walk would hang on it)."""
        found = set()
        for path in self.root.rglob("*"):
            if self.run in path.parents or path == self.run:
                continue  # the hook's own cache lives there
            if path.is_file():
                found.add(f"{path.relative_to(self.root)}:{path.stat().st_mtime_ns}")
        return found

    def call(
        self, name: str, xml: bytes, op: str = "prepare begin", env: dict[str, str] | None = None
    ) -> Outcome:
        before = self.files()
        started = time.monotonic()
        result = subprocess.run(
            [str(self.hook), name, *op.split(), "-"],
            input=xml,
            capture_output=True,
            timeout=LIMIT,
            check=False,
            env={"PATH": "/usr/bin:/bin", "KSMPOLICY_HOOK_DEADLINE": "1", **(env or {})},
        )
        seconds = time.monotonic() - started
        text = result.stderr.decode("utf-8", "replace")
        assert "Traceback" not in text, text
        return Outcome(result.returncode, text.splitlines(), seconds, self.files() ^ before)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def expect_excluded(outcome: Outcome, mode: str) -> None:
    """What a tenant VM that must not merge, started without <nosharepages/>, gets."""
    assert outcome.written == set()
    assert len(outcome.lines) <= 1, outcome.lines
    if mode == "off":
        assert (outcome.status, outcome.lines) == (0, [])
    elif mode == "warn":
        assert outcome.status == 0
        assert "must not share memory" in outcome.lines[0]
    else:
        assert outcome.status == 1
        assert "must not share memory" in outcome.lines[0]


# --- 1. image identity cannot be forged by a guest -----------------------------------------


def forged_cases(host: Host) -> dict[str, bytes]:
    """Ways a guest's own bytes could claim the provider's image, each as a domain XML."""
    target = str(host.provider / "base.qcow2")
    raw = host.images / "tenant.img"
    forged_raw(raw, target)
    overlay_raw = host.images / "overlay-raw.qcow2"
    qcow2(overlay_raw, str(raw), "raw")
    overlay_undeclared = host.images / "overlay-undeclared.qcow2"
    qcow2(overlay_undeclared, str(raw), None)
    live_raw = (
        f"<backingStore type='file'><format type='raw'/><source file='{raw}'/>"
        "<backingStore/></backingStore>"
    )
    return {
        "raw disk declared raw": domain("tenant", disk(str(raw), "raw")),
        "raw disk, format not declared": domain("tenant", disk(str(raw), None)),
        "raw disk declared RAW": domain("tenant", disk(str(raw), "RAW")),
        "qcow2 overlay on a declared raw base": domain("tenant", disk(str(overlay_raw), "qcow2")),
        "qcow2 overlay whose base format is not declared": domain(
            "tenant", disk(str(overlay_undeclared), "qcow2")
        ),
        "live chain ending in a raw layer": domain(
            "tenant", disk(str(host.images / "live.qcow2"), "qcow2", live_raw)
        ),
    }


@pytest.mark.parametrize("mode", MODES)
def test_a_guest_cannot_pick_its_image_group(host: Host, mode: str) -> None:
    host.write_policy(mode)
    baseline_disk = host.images / "plain.img"
    baseline_disk.write_bytes(os.urandom(8192))
    baseline = host.call("tenant", domain("tenant", disk(str(baseline_disk), "raw")))
    expect_excluded(baseline, mode)
    for case, xml in forged_cases(host).items():
        outcome = host.call("tenant", xml)
        expect_excluded(outcome, mode)
        assert (outcome.status, outcome.lines) == (baseline.status, baseline.lines), case


def test_the_provider_image_itself_is_still_recognised(host: Host) -> None:
    """The same policy lets a real provider VM merge: the rule works when the image is real."""
    host.write_policy("block")
    base = host.provider / "base.qcow2"
    qcow2(base)
    overlay = host.images / "web-1.qcow2"
    qcow2(overlay, str(base), "qcow2")
    outcome = host.call("web-1", domain("web-1", disk(str(overlay), "qcow2")))
    assert (outcome.status, outcome.lines) == (0, [])


def test_a_forged_backing_name_is_never_opened(host: Host) -> None:
    """The name a guest writes is not even opened: a FIFO there would block an open()."""
    host.write_policy("block")
    trap = host.root / "trap"
    os.mkfifo(trap)
    raw = host.images / "tenant.img"
    forged_raw(raw, str(trap))
    for driver in ("raw", None):
        outcome = host.call("tenant", domain("tenant", disk(str(raw), driver)))
        expect_excluded(outcome, "block")
        assert outcome.seconds < 5


# --- 2. nothing hangs a start -------------------------------------------------------------


def fifo_cases(host: Host) -> dict[str, bytes]:
    fifo = host.images / "fifo.qcow2"
    os.mkfifo(fifo)
    overlay = host.images / "overlay.qcow2"
    qcow2(overlay, str(fifo), "qcow2")
    return {
        "a FIFO as the disk": domain("tenant", disk(str(fifo), "qcow2")),
        "a FIFO as the backing file": domain("tenant", disk(str(overlay), "qcow2")),
        "a character device as the disk": domain("tenant", disk("/dev/zero", "qcow2")),
    }


@pytest.mark.parametrize("mode", MODES)
def test_fifos_and_devices_as_disks_never_block(host: Host, mode: str) -> None:
    host.write_policy(mode)
    for case, xml in fifo_cases(host).items():
        outcome = host.call("tenant", xml)
        assert outcome.seconds < 5, case
        expect_excluded(outcome, mode)  # the decision does not depend on them either


@pytest.mark.parametrize("mode", MODES)
def test_a_policy_that_is_a_fifo_never_blocks_the_hook(host: Host, mode: str) -> None:
    host.write_policy(mode)
    xml = domain("tenant", disk(str(host.images / "a.img"), "raw"))
    first = host.call("tenant", xml)  # compiles the last good policy into the run directory
    host.policy.unlink()
    os.mkfifo(host.policy)
    outcome = host.call("tenant", xml)
    assert outcome.seconds < 5
    assert outcome.status == first.status  # the last good policy still decides
    assert len(outcome.lines) == 1
    assert "policy not usable" in outcome.lines[0]
    assert "is a FIFO, not a regular file" in outcome.lines[0]
    if first.lines:
        assert outcome.lines[0].endswith(first.lines[0].removeprefix("ksmpolicy: "))


def hanging_filesystem_available() -> bool:
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError):
        return False
    return IS_ROOT and Path("/dev/fuse").exists()


needs_fuse = pytest.mark.skipif(
    not hanging_filesystem_available(),
    reason="needs root, /dev/fuse and fusepy with libfuse2 (scripts/bootstrap installs them)",
)


@needs_fuse
@pytest.mark.root
@pytest.mark.parametrize("mode", MODES)
def test_a_hung_filesystem_is_cut_off_by_the_deadline(host: Host, mode: str) -> None:
    from lab.slowfs import mounted

    host.write_policy(mode)
    with mounted(host.root.parent / "nfs") as nfs:  # outside the tree Host.files() walks
        for case, path in (("reads hang", "slow.qcow2"), ("stat hangs", "stuck.qcow2")):
            outcome = host.call("tenant", domain("tenant", disk(str(nfs / path), "qcow2")))
            assert outcome.seconds < 5, case
            assert outcome.written == set()
            if mode == "off":
                assert (outcome.status, outcome.lines) == (0, []), case
                continue
            assert outcome.lines[-1].startswith('ksmpolicy: "tenant" not checked within 1 s')
            assert outcome.status == (1 if mode == "block" else 0), case


@needs_fuse
@pytest.mark.root
def test_a_policy_on_a_hung_filesystem_falls_back_to_the_last_good_one(host: Host) -> None:
    from lab.slowfs import mounted

    host.write_policy("block")
    xml = domain("tenant", disk(str(host.images / "a.img"), "raw"))
    assert host.call("tenant", xml).status == 1
    with mounted(host.root.parent / "nfs") as nfs:
        host.policy.unlink()
        host.policy.symlink_to(nfs / "policy.yaml")
        outcome = host.call("tenant", xml)
    assert outcome.seconds < 5
    assert outcome.status == 1  # the last good policy said block
    assert outcome.lines[-1].startswith('ksmpolicy: "tenant" not checked within 1 s')


# --- 3. linear time ------------------------------------------------------------------------


def test_megabytes_of_entity_references_are_checked_at_once(host: Host) -> None:
    host.write_policy("block")
    description = "&amp;&lt;&#x41;" * (16 * 2**20 // 15)
    extra = f"  <description>{description}</description>\n"
    outcome = host.call("tenant", domain("tenant", disk(str(host.images / "a.img"), "raw"), extra))
    expect_excluded(outcome, "block")
    assert outcome.seconds < 3, f"16 MB of entity references took {outcome.seconds:.1f} s"


def test_an_alias_bomb_policy_is_refused_at_once(host: Host) -> None:
    lines = ["version: 1", "enforcement: warn", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    host.write_policy("warn", "\n".join(lines) + "\n")
    outcome = host.call("tenant", domain("tenant"))
    assert outcome.seconds < 2
    assert outcome.status == 0
    assert outcome.lines == [
        f'ksmpolicy: policy not usable, "tenant" not checked: {host.policy}:1: YAML aliases '
        + outcome.lines[0].split(":1: YAML aliases ", 1)[1]
    ]
    assert "an alias bomb?" in outcome.lines[0]


# --- 4. a policy no one else can swap --------------------------------------------------------


@pytest.mark.root
def test_a_policy_under_a_directory_others_own_is_refused(host: Host) -> None:
    host.write_policy("block")
    xml = domain("tenant", disk(str(host.images / "a.img"), "raw"))
    assert host.call("tenant", xml).status == 1  # trusted: compiled as the last good one
    shared = host.root / "shared"
    shared.mkdir()
    os.chown(shared, 65534, 65534)  # a local user's directory on the path
    moved = shared / "policy.yaml"
    moved.write_text("version: 1\nenforcement: block\ndefault: merge\n")
    moved.chmod(0o644)
    check = subprocess.run(
        [str(Path(sys.executable).with_name("ksmpolicy")), "check", str(moved)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 1
    assert f"{shared} (directory) belongs to uid 65534" in check.stderr
    # The hook given that path: no last good for it, and its text is not root's to trust.
    hook = host.root / "qemu-shared"
    hook.write_text(shim(sys.executable, str(moved), str(host.run)))
    hook.chmod(0o755)
    result = subprocess.run(
        [str(hook), "tenant", "prepare", "begin", "-"],
        input=xml,
        capture_output=True,
        timeout=LIMIT,
        check=False,
    )
    assert result.returncode == 0  # it says block, but a local user could have written that
    assert b"belongs to uid 65534" in result.stderr


@pytest.mark.root
def test_a_symlink_a_local_user_owns_is_refused(host: Host) -> None:
    host.write_policy("block")
    link = host.root / "via-link.yaml"
    link.symlink_to(host.policy)
    os.lchown(link, 65534, 65534)
    check = subprocess.run(
        [str(Path(sys.executable).with_name("ksmpolicy")), "check", str(link)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 1
    assert f"{link} (symbolic link) belongs to uid 65534" in check.stderr


@pytest.mark.parametrize("mode", ("warn", "block"))
def test_deleting_the_policy_does_not_switch_enforcement_off(host: Host, mode: str) -> None:
    host.write_policy(mode)
    xml = domain("tenant", disk(str(host.images / "a.img"), "raw"))
    first = host.call("tenant", xml)
    host.policy.unlink()
    outcome = host.call("tenant", xml)
    assert outcome.status == first.status
    assert len(outcome.lines) == 1
    assert "no such file" in outcome.lines[0]
    assert "checked against the last good policy" in outcome.lines[0]
    assert outcome.lines[0].endswith(first.lines[0].removeprefix("ksmpolicy: "))


# --- 5. a broken policy that says block, in any spelling the validator accepts ----------------

SAYS_BLOCK = [
    "enforcement: BLOCK\nrulez: []\n",
    'enforcement: "block"\nrulez: []\n',
    "'enforcement': 'Block'\nrulez: []\n",
    "\ufeffenforcement: block\nrulez: []\n",
    "enforcement: block   # strict\nrulez: []\n",
    "{version: 1, enforcement: block, rulez: []}\n",
    "enforcement: block\nrules: [\n",  # not even YAML any more
    "enforcement: 'BLOCK' # strict\nrules: {\n",
]
SAYS_NOT_BLOCK = [
    "enforcement: blocked\nrulez: []\n",
    "# enforcement: block\nrulez: []\n",
    "x:\n  enforcement: block\nrulez: []\n",
    "enforcement: warn\nrules: [\n",
]


@pytest.mark.parametrize("text", SAYS_BLOCK)
def test_a_broken_policy_that_says_block_blocks(host: Host, text: str) -> None:
    host.write_policy(
        "block", "version: 1\n" + text if not text.startswith(("{", "\ufeff")) else text
    )
    outcome = host.call("tenant", domain("tenant"))
    assert outcome.status == 1, outcome.lines
    assert len(outcome.lines) == 1 and "policy not usable" in outcome.lines[0]


@pytest.mark.parametrize("text", SAYS_NOT_BLOCK)
def test_a_broken_policy_that_does_not_say_block_does_not(host: Host, text: str) -> None:
    host.write_policy("warn", "version: 1\n" + text)
    outcome = host.call("tenant", domain("tenant"))
    assert outcome.status == 0, outcome.lines
    assert len(outcome.lines) == 1


# --- 6. messages are safe to paste -------------------------------------------------------------

NAMES = [
    "db-$(touch PWNED)",
    "db-`touch PWNED`",
    "db-'quoted'\"twice\"",
    "db; touch PWNED",
    "db-\nsecond line",
    "db-\x85next",
    "db-\u2028next",
    "db-\u202egnp.exe",  # a right-to-left override: shows as db-exe.png
    "db-\u2066x\u2069",  # an isolate
    "db\u200b-zero-width",
]


@pytest.mark.parametrize("name", NAMES)
def test_the_suggested_fix_runs_nothing_but_ksmpolicy(
    host: Host, name: str, tmp_path: Path
) -> None:
    host.write_policy("block")
    escaped = name.replace("&", "&amp;").replace("<", "&lt;")
    outcome = host.call(name, domain(escaped, disk(str(host.images / "a.img"), "raw")))
    assert outcome.status == 1
    assert len(outcome.lines) == 1
    assert outcome.lines[0].isprintable(), outcome.lines  # escaped: nothing hidden or reordered
    words = pasted(outcome.lines[0].split(" Fix: ", 1)[1], "ksmpolicy", tmp_path)
    expected = name if name.isprintable() else "6e6b7d53-8d7a-4c1e-9f0a-1b2c3d4e5f60"
    assert words == ["apply", "--domain", expected]


def pasted(command: str, program: str, tmp_path: Path) -> list[str]:
    """`command` pasted into a shell where `program` only prints its arguments: those
    arguments, after checking that nothing else ran (no PWNED file, no error)."""
    workdir = tmp_path / "paste"
    workdir.mkdir()
    result = subprocess.run(
        ["sh", "-c", f'{program}() {{ printf "%s\\0" "$@"; }}\n' + command],
        capture_output=True,
        cwd=workdir,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not (workdir / "PWNED").exists()
    return result.stdout.decode().split("\0")[:-1]


@pytest.mark.root
@pytest.mark.parametrize("name", ["d-$(touch PWNED)", "d-`touch PWNED`", "d; touch PWNED", "d'q'"])
def test_a_path_in_a_hint_is_quoted_for_the_shell(host: Host, name: str, tmp_path: Path) -> None:
    shared = host.root / name  # a local user names their own directory
    shared.mkdir()
    os.chown(shared, 65534, 65534)
    policy = shared / "policy.yaml"
    policy.write_text("version: 1\n")
    policy.chmod(0o644)
    check = ksmpolicy("check", str(policy))
    assert check.returncode == 1
    command = check.stderr.split("run: ", 1)[1].splitlines()[0]
    assert pasted(command, "chown", tmp_path) == ["-h", "root", str(shared)]


@pytest.mark.root
def test_a_hook_line_is_one_line_whatever_a_path_holds(host: Host) -> None:
    host.write_policy("warn")
    theirs = host.root / "evil\n\x1b[2Jnext"  # a local user's directory, named to break lines
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    (theirs / "policy.yaml").write_text("version: 1\nenforcement: warn\n")
    host.policy.unlink()
    host.policy.symlink_to(theirs / "policy.yaml")  # root's link, into their directory
    outcome = host.call("tenant", domain("tenant", disk(str(host.images / "a.img"), "raw")))
    assert outcome.status == 0
    assert len(outcome.lines) == 1, outcome.lines
    assert "\x1b" not in outcome.lines[0]
    assert "evil\\u000a\\u001b[2Jnext (directory) belongs to uid 65534" in outcome.lines[0]


# --- 7. every input error is a clear error -------------------------------------------------------


def ksmpolicy(
    *args: str, stdin: int | None = None, input_: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ksmpolicy")), *args],
        stdin=stdin,
        input=None if input_ is None else input_.decode(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_an_integer_beyond_pythons_limit_is_a_line_not_a_crash(host: Host) -> None:
    big = "9" * 5000
    host.write_policy(
        "warn", f"version: 1\nenforcement: warn\nreconciler: {{interval_seconds: {big}}}\n"
    )
    result = ksmpolicy("check", str(host.policy))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{host.policy}:3: reconciler.interval_seconds: bad value '999")
    assert "a number of 5000 characters; no setting needs one that long" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    outcome = host.call("tenant", domain("tenant"))
    assert outcome.status == 0  # a warn policy never blocks, broken or not
    assert len(outcome.lines) == 1


def test_yaml_11_keys_and_tags_stay_as_written(host: Host) -> None:
    host.write_policy(
        "warn",
        "version: 1\nvms:\n  no: {tags: [database]}\n  name:0101: {tags: [database]}\n"
        "  1_000: {tags: [no, 0101, 2024-01-01]}\n"
        "rules:\n  - {match: {tags: [database, 'no', '0101', '2024-01-01']}, action: exclude}\n",
    )
    for name in ("no", "0101", "1_000"):
        result = ksmpolicy("-p", str(host.policy), "explain", "--name", name, "--json")
        assert result.returncode == 0, result.stderr
        assert '"action": "exclude"' in result.stdout, (name, result.stdout)
    result = ksmpolicy("-p", str(host.policy), "explain", "--name", "1000", "--json")
    assert '"action": "merge"' in result.stdout  # 1_000 is not 1000
    # A bare 0101 could be a name or a number: refused, and named as written (not 65).
    host.write_policy("warn", "version: 1\nvms:\n  0101: {tags: [database]}\n")
    result = ksmpolicy("check", str(host.policy))
    assert result.returncode == 1
    assert "vms.0101: could be a VM's name, but looks like a number: write 'name:0101'" in (
        result.stderr
    )


def test_closed_stdin_is_one_line(host: Host) -> None:
    host.write_policy("warn")
    result = ksmpolicy("-p", str(host.policy), "xml", "rewrite", stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    closed = subprocess.run(
        [
            str(Path(sys.executable).with_name("ksmpolicy")),
            "-p",
            str(host.policy),
            "xml",
            "rewrite",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        preexec_fn=lambda: os.close(0),  # the point: no stdin at all
    )
    assert closed.returncode == 1
    assert (
        closed.stderr == "ksmpolicy: error: standard input is closed: give a FILE, or pipe one in\n"
    )
    hook = subprocess.run(
        [str(host.hook), "tenant", "prepare", "begin", "-"],
        capture_output=True,
        timeout=LIMIT,
        check=False,
        preexec_fn=lambda: os.close(0),
    )
    assert hook.returncode == 0
    assert hook.stderr.decode().splitlines() == [
        'ksmpolicy: cannot check "tenant": no domain XML: standard input is closed'
    ]


@pytest.mark.parametrize(("mode", "expected"), [("warn", 0), ("block", 1)])
@pytest.mark.parametrize("op", ["prepare begin", "migrate begin", "restore begin"])
def test_a_stdin_that_never_closes_ends_at_the_deadline(
    host: Host, mode: str, expected: int, op: str
) -> None:
    """libvirt (or anyone calling the hook) writes part of a domain XML and never closes the
    pipe: the hook ends at its deadline, with one line and the mode's outcome."""
    host.write_policy(mode)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, domain("tenant")[:40])  # the start of an XML, then nothing
        started = time.monotonic()
        result = subprocess.run(
            [str(host.hook), "tenant", *op.split(), "-"],
            stdin=read_end,
            capture_output=True,
            timeout=LIMIT,
            check=False,
            env={"PATH": "/usr/bin:/bin", "KSMPOLICY_HOOK_DEADLINE": "1"},
        )
        seconds = time.monotonic() - started
    finally:  # the child the hook left reading now sees the end and leaves too
        os.close(write_end)
        os.close(read_end)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == expected, lines
    assert len(lines) == 1, lines
    outcome = "refusing the start" if mode == "block" else "starting it anyway"
    assert lines[0].startswith('ksmpolicy: "tenant" not checked within 1 s'), lines
    assert lines[0].endswith(f"{outcome}" + (" (enforcement: block)" if mode == "block" else ""))
    assert result.stdout == b""  # migrate/restore: no XML, libvirt keeps its own
    assert seconds < 4


def test_proxmox_arguments_are_checked(host: Host) -> None:
    host.write_policy("warn")
    conf = REPO / "tests/data/proxmox/qs-simple1.conf"
    result = ksmpolicy(
        "-p", str(host.policy), "proxmox", "rewrite", "--qemu-server-version", "abc", str(conf)
    )
    assert result.returncode == 2
    assert "'abc' is not a version like 8.4.1" in result.stderr
    result = ksmpolicy("-p", str(host.policy), "proxmox", "rewrite", "--vmid", "../..", str(conf))
    assert result.returncode == 1
    assert "'../..' is not a VMID" in result.stderr
    result = ksmpolicy("-p", str(host.policy), "proxmox", "rewrite", "--vmid", "99", str(conf))
    assert result.returncode == 1  # below Proxmox's range (100 to 999999999)
    result = ksmpolicy("-p", str(host.policy), "proxmox", "rewrite", input_=conf.read_bytes())
    assert result.returncode == 2
    assert "give --vmid VMID" in result.stderr


# --- 8. Proxmox configs split lines as Proxmox does ----------------------------------------------


@pytest.mark.parametrize("separator", ["\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028"])
def test_a_hidden_line_in_a_proxmox_config_is_no_key(tmp_path: Path, separator: str) -> None:
    from ksmpolicy.policy.decide import Decider
    from ksmpolicy.policy.load import parse_policy
    from ksmpolicy.proxmox.rewrite import apply_policy

    policy = parse_policy("version: 1\nrules:\n  - {match: {tags: [database]}, action: exclude}\n")
    base = "boot: order=scsi0\nmemory: 2048\nname: web{}\nscsi0: local-lvm:vm-101-disk-0\n"
    hostile = base.format(f"{separator}tags: database")
    new, facts, decision, _note = apply_policy(hostile, "101", Decider(policy))
    assert facts.vm.tags == frozenset() and decision.action.value == "merge"
    assert new == hostile
    crlf = base.format("").replace("\n", "\r\n")
    excluded = apply_policy(
        crlf.replace("name: web", "tags: database\r\nname: web"), "101", Decider(policy)
    )[0]
    assert "allow-ksm: 0\r\n" in excluded and "\r\r" not in excluded


# --- 9. a local user's processes: names and command lines are theirs -----------------------------

IMPOSTOR = """
import ctypes, sys, time
libc = ctypes.CDLL(None)
libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: the name it shows in /proc
libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/PID is then root's, whoever runs it
if "--merge" in sys.argv:
    libc.prctl(67, 1, 0, 0, 0)  # PR_SET_MEMORY_MERGE: its memory mergeable, as anyone may
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.root
def test_a_local_users_impostors_change_nothing(tmp_path: Path) -> None:
    """Processes a user starts under the names of QEMU (with a command line no QEMU would
    take), ksmtuned, ksmd, libvirtd and the ksmpolicy daemon: the scan, status, doctor and
    the daemon's view of other controllers go on as if they were not there."""
    from ksmpolicy.kernel.controllers import daemon_pids, other_controllers
    from ksmpolicy.kernel.procfs import ksmd_pid
    from ksmpolicy.kernel.scan import ProcessScanner
    from ksmpolicy.libvirt.install import libvirtd_pids
    from ksmpolicy.paths import HostPaths

    impostors = {
        "qemu": ["qemu-system-x86", "-m", "9" * 400, "-name", "guest=tenant,debug-threads=on"],
        "ksmtuned": ["ksmtuned"],
        "ksmd": ["ksmd"],
        "libvirtd": ["libvirtd"],
        "daemon": ["python3", "/usr/bin/ksmpolicy", "daemon"],
        "escape": ["\x1b[2J\nOK vm", "--merge"],  # a name that clears a terminal, two lines
    }
    started = {}
    try:
        for what, args in impostors.items():
            process = subprocess.Popen(
                [*AS_NOBODY, "/usr/bin/python3", "-c", IMPOSTOR, *args],
                stdout=subprocess.PIPE,
                cwd=tmp_path,
            )
            started[what] = process
            assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        pids = {what: process.pid for what, process in started.items()}
        paths = HostPaths()
        found = {p.pid: p for p in ProcessScanner(paths).scan()}
        qemu = found[pids["qemu"]]
        assert (qemu.kind, qemu.ram_bytes, qemu.uid, qemu.trusted) == ("qemu", None, 65534, False)
        assert not any(
            str(pid) in c.detail for c in other_controllers(paths) for pid in pids.values()
        )
        assert not set(daemon_pids(paths)) & set(pids.values())
        assert ksmd_pid(paths) not in pids.values()
        assert not set(libvirtd_pids(paths)) & set(pids.values())
        assert found[pids["escape"]].name == f"\x1b[2J\nOK vm[{pids['escape']}]"
        for command in (["status"], ["doctor"], ["reconcile", "--once", "--dry-run"]):
            result = ksmpolicy(*command)
            assert "internal error" not in result.stderr, (command, result.stderr)
            assert result.returncode in (0, 1), (command, result.stderr)
            assert "\x1b" not in result.stdout + result.stderr, command
        doctor = ksmpolicy("doctor").stdout
        assert f"pid {pids['qemu']} calls itself this VM" in doctor
        assert "--domain tenant" not in doctor
        status = ksmpolicy("status").stdout
        assert "\n\\u001b[2J\\u000a" in status, status  # escaped, in its row
        assert f"pid {pids['qemu']} calls itself this VM but is not run by root" in status
        assert "--domain tenant" not in status  # no fix that would act on a real VM "tenant"
    finally:
        for process in started.values():
            process.kill()
            process.wait(timeout=10)
