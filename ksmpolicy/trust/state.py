"""The shared state of trust domains: which domain each merge scope belongs to, and which VMs
are switched on for it.

`/run/ksmpolicy/domains.json`, root-only (0600 in the 0700 run directory). The daemon rewrites
it on every look; the Proxmox hookscript claims an idle scope at post-start; `status` and
`audit` read it. Every change happens under an exclusive lock on `domains.lock` beside it.
A missing, unreadable or untrusted file is an empty state: no scope is claimed, so nothing is
switched on until a claim is made again (it fails safe).

A claim holds while a VM it switched on still runs (a member: PID and start time, so a reused
PID does not count); a scope whose members have all stopped is idle and the next VM to start
may claim it for its domain.
"""

from __future__ import annotations

import json
import os

from ksmpolicy.kernel.procfs import start_ticks
from ksmpolicy.paths import HostPaths
from ksmpolicy.records import dataclass, field
from ksmpolicy.trust.choose import Claim

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

STATE_FILE = "domains.json"
LOCK_FILE = "domains.lock"
MAX_STATE_BYTES = 8 * 2**20
VERSION = 1


@dataclass(frozen=True)
class Member:
    """A running VM switched on (mergeable) for its domain."""

    pid: int
    start: int  # start time in clock ticks since boot (/proc/PID/stat field 22)
    name: str
    domain: str
    scopes: tuple[str, ...]


@dataclass
class State:
    scopes: dict[str, Claim] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)
    # What unmerging each scope's active domain would re-materialise (bytes), as last measured.
    unmerge_bytes: dict[str, int] = field(default_factory=dict)
    updated: float = 0.0

    def live_domains(self, paths: HostPaths) -> dict[str, str]:
        """scope -> the claimed domain, for claims that still have a running member."""
        alive = [m for m in self.members.values() if start_ticks(paths, m.pid) == m.start]
        found = {}
        for scope, claim in self.scopes.items():
            if any(m.domain == claim.domain and scope in m.scopes for m in alive):
                found[scope] = claim.domain
        return found

    def prune(self, paths: HostPaths) -> None:
        """Forget members that stopped, and claims left without a member."""
        self.members = {
            pid: m for pid, m in self.members.items() if start_ticks(paths, pid) == m.start
        }
        live = self.live_domains(paths)
        self.scopes = {s: c for s, c in self.scopes.items() if s in live}


def load(paths: HostPaths) -> State:
    """The state as last saved; an empty state when there is none or it cannot be trusted."""
    from ksmpolicy.files import read_own_file, untrusted_reason  # noqa: PLC0415

    path = paths.run_dir / STATE_FILE
    try:
        if os.geteuid() == 0 and untrusted_reason(path) is not None:
            return State()
        data = read_own_file(path, MAX_STATE_BYTES)
    except OSError:
        return State()
    if data is None:
        return State()
    try:
        raw = json.loads(data)
        if raw.get("version") != VERSION:
            return State()
        return State(
            scopes={
                str(s): Claim(str(c["domain"]), float(c["since"]), str(c["why"]))
                for s, c in raw["scopes"].items()
            },
            members={
                int(m["pid"]): Member(
                    int(m["pid"]),
                    int(m["start"]),
                    str(m["name"]),
                    str(m["domain"]),
                    tuple(str(s) for s in m["scopes"]),
                )
                for m in raw["members"]
            },
            unmerge_bytes={str(k): int(v) for k, v in raw.get("unmerge_bytes", {}).items()},
            updated=float(raw.get("updated", 0.0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return State()


def save(paths: HostPaths, state: State) -> None:
    from ksmpolicy.files import make_private_dir, write_atomic  # noqa: PLC0415

    raw = {
        "version": VERSION,
        "updated": state.updated,
        "scopes": {
            s: {"domain": c.domain, "since": c.since, "why": c.why}
            for s, c in sorted(state.scopes.items())
        },
        "members": [
            {
                "pid": m.pid,
                "start": m.start,
                "name": m.name,
                "domain": m.domain,
                "scopes": list(m.scopes),
            }
            for m in sorted(state.members.values(), key=lambda m: m.pid)
        ],
        "unmerge_bytes": dict(sorted(state.unmerge_bytes.items())),
    }
    make_private_dir(paths.run_dir)
    data = json.dumps(raw, indent=1).encode()
    write_atomic(paths.run_dir / STATE_FILE, data, 0o600, private_dir=True)


class locked:  # lower case: used like a function, `with locked(paths) as state:`
    """Hold the state's lock; yields the state, and saves it on a clean exit."""

    def __init__(self, paths: HostPaths, *, timeout: float = 3.0) -> None:
        self.paths = paths
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> State:
        import fcntl  # noqa: PLC0415
        import time  # noqa: PLC0415

        from ksmpolicy.files import make_private_dir  # noqa: PLC0415

        make_private_dir(self.paths.run_dir)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.paths.run_dir / LOCK_FILE, flags, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"{self.paths.run_dir / LOCK_FILE} is held") from None
                time.sleep(0.02)
        self.state = load(self.paths)
        return self.state

    def __exit__(self, kind: object, *_rest: object) -> None:
        try:
            if kind is None:
                save(self.paths, self.state)
        finally:
            os.close(self.fd)  # releases the lock


def admit(paths: HostPaths, member: Member, now: float) -> tuple[bool, str]:
    """For a VM that starts: may it merge now? It may when every scope it counts in is idle
    or already its domain's; idle scopes are claimed for its domain. Switching a scope from
    one domain to another (unmerging the first) is the daemon's work, not a hook's."""
    with locked(paths) as state:
        state.prune(paths)
        live = state.live_domains(paths)
        for scope in member.scopes:
            owner = live.get(scope)
            if owner is not None and owner != member.domain:
                return False, f"merge scope {scope} belongs to trust domain {owner!r}"
        for scope in member.scopes:
            if scope not in state.scopes:
                state.scopes[scope] = Claim(member.domain, now, f"{member.name} started first")
        state.members[member.pid] = member
        state.updated = now
        return True, f"trust domain {member.domain!r} merges in {', '.join(member.scopes)}"


def members_of(state: State, domain: str) -> Iterator[Member]:
    return (m for m in state.members.values() if m.domain == domain)
