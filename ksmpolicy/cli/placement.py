"""Placement by sharing: `sketch` (this host's VMs, comparable between hosts), `index` (the
hosts' sketches read and checked once, kept for `--index`), `place` (where a VM would share the
most) and `rebalance` (migrations that would save the most, printed)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ksmpolicy.cli.common import INTERVAL, ROOT, Options, host_paths, policy_option
from ksmpolicy.paths import FLEET_INDEX, FLEET_KEY, STATE_DIR
from ksmpolicy.quoting import one_line

if TYPE_CHECKING:
    from ksmpolicy.placement.fleetindex import FleetIndex
    from ksmpolicy.placement.plan import Prediction
    from ksmpolicy.placement.sketch import HostSketch, VmSketch

MIB = 2**20
OLD_SECONDS = 3600.0  # a sketch older than this is said to be old
HOST_HELP = (
    "A host's sketch: a file `ksmpolicy sketch --out` wrote, or a daemon's /sketch URL "
    "(fetched directly: no proxy, no redirect). Repeat for each host. Each must be sealed "
    "under this host's fleet key."
)
HOSTS = click.option("--host", "hosts", multiple=True, metavar="FILE|URL", help=HOST_HELP)
INDEX = click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Answer from the fleet index `ksmpolicy index` wrote in DIR (instead of --host): no "
    "sketch is read again. DIR and every directory above it must be root's alone.",
)
RESERVE = click.option(
    "--reserve-mib",
    type=click.IntRange(0, None),
    default=1024,
    show_default=True,
    help="Memory every host keeps free after a move (MiB of MemAvailable).",
)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the sketch as JSON.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the sketch (JSON) to FILE, atomically, for `place` and `rebalance`.",
)
@click.option(
    "--k",
    "k",
    type=click.IntRange(1, 2**20),
    default=64,
    show_default=True,
    help="Sample one page content in K (larger: smaller sketches, larger error).",
)
@INTERVAL
@click.option("--vm", "names", multiple=True, metavar="NAME", help="Only these VMs.")
@click.option(
    "--new-key",
    is_flag=True,
    help=f"Make the fleet key, {FLEET_KEY} (root's, mode 0600), if there is none (one that "
    "is there is kept), then sketch as usual. Copy that file to every host whose sketches you "
    "compare.",
)
@ROOT
@policy_option
@click.pass_obj
def sketch(
    options: Options,
    as_json: bool,
    out: Path | None,
    k: int,
    interval: float,
    names: tuple[str, ...],
    new_key: bool,
    root: str,
) -> None:
    """Summarise what each running VM's memory holds, comparably between hosts (root).

    Reads every present page of each VM's guest RAM, as `estimate` does, keeps
    one page content in K (chosen by content, so the same on every host), drops
    those that change within --interval, and records each kept content as a
    hash keyed by the fleet key: no page content and nothing a reader without
    the key can test a guess against. Prints a summary, or JSON (--json, --out).
    """
    from ksmpolicy.files import write_atomic  # noqa: PLC0415
    from ksmpolicy.placement.document import to_json  # noqa: PLC0415
    from ksmpolicy.placement.sketch import SketchError, load_key, sketch_host  # noqa: PLC0415

    paths = host_paths(root)
    policy, error = options.load_or_error()
    if error is not None:  # without it, every VM would be sketched in `default`
        raise SketchError(f"{error}: a sketch records each VM's trust domain; fix the policy")
    key, made = load_key(paths, create=new_key)
    if made:
        click.echo(f"made the fleet key {paths.under_root(FLEET_KEY)}", err=True)
    found = sketch_host(paths, policy, key, k=k, interval=interval, names=names)
    document = to_json(found, key)
    if out is not None:
        write_atomic(out, (json.dumps(document) + "\n").encode(), 0o644)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    lines = [f"{found.host}: {len(found.vms)} VMs, 1 page content in {found.k} sampled"]
    for vm in found.vms:
        lines.append(
            f"  {one_line(vm.name):<24} domain {vm.domain:<12} "
            f"{vm.present_pages * 4096 / MIB:8.1f} MiB present, {len(vm.values):6} samples, "
            f"{vm.zero_pages * 4096 / MIB:7.1f} MiB zero, "
            f"{vm.volatile_pages * 4096 / MIB:6.1f} MiB volatile"
            + ("" if vm.merges else " (excluded)")
        )
    if out is not None:
        lines.append(f"written to {out}")
    click.echo("\n".join(lines))


@click.command("index")
@click.option("--host", "hosts", multiple=True, required=True, metavar="FILE|URL", help=HOST_HELP)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Write the index into DIR (root's alone; made 0700 if missing). Default: "
    f"{STATE_DIR}/{FLEET_INDEX}.",
)
@ROOT
def index_(hosts: tuple[str, ...], out: Path | None, root: str) -> None:
    """Read and check the hosts' sketches once, for `place --index` (root).

    Each sketch is read as `place --host` reads it (its seal checked under the
    fleet key, then every field), then kept in DIR: every VM's figures and
    values, and what each host's VMs of each trust domain hold, sorted once.
    `place --index DIR` then answers in well under a second for a thousand
    hosts. Build it again when the sketches change: it says when they were taken.
    """
    from ksmpolicy.placement.fleetindex import write_index  # noqa: PLC0415

    sketches = _read(hosts, root)
    directory = out or host_paths(root).fleet_index
    size = write_index(directory, sketches, built_at=time.time())
    vms = sum(len(s.vms) for s in sketches)
    taken = [s.taken_at for s in sketches]
    click.echo(
        f"indexed {len(sketches)} hosts, {vms} VMs (sketches taken {_when(min(taken))} to "
        f"{_when(max(taken))}) into {directory}: {size / MIB:.0f} MiB"
    )


@click.command()
@click.argument("vm", required=False)
@HOSTS
@INDEX
@RESERVE
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for schedulers).")
@ROOT
def place(
    vm: str | None,
    hosts: tuple[str, ...],
    index_dir: Path | None,
    reserve_mib: int,
    as_json: bool,
    root: str,
) -> None:
    """Where VM would save the most: for each host, what it would share there.

    VM (a UUID, a Proxmox VMID, or else a name) must be in one of the
    sketches (its current host). Only VMs of its own trust domain on a host
    count, and only those that merge there now; nothing where another trust
    domain merges; zero pages as that host's use_zero_pages merges them.
    Headroom: the host's MemAvailable after the move, less --reserve-mib.
    Without VM: each VM that may merge, its best other host and what moving
    there would gain, as a scheduler reads it (--json). Needs the fleet key
    (root): each sketch's seal is checked under it (--host), or the index
    was built under it (--index).
    """
    from ksmpolicy.placement.plan import place as rank  # noqa: PLC0415

    fleet = _index(index_dir, hosts, root)
    if vm is None:
        _every_vm(hosts, root, fleet, reserve_mib, as_json)
        return
    reserve = reserve_mib * MIB
    if fleet is None:
        subject, ranked = rank(_read(hosts, root), vm, reserve_bytes=reserve)
    else:
        subject, ranked = fleet.place(vm, reserve_bytes=reserve)
    _one_vm(subject, ranked, fleet, as_json)


def _one_vm(
    subject: VmSketch, ranked: list[Prediction], fleet: FleetIndex | None, as_json: bool
) -> None:
    if as_json:
        hosts = [dataclasses.asdict(p) for p in ranked]
        document: dict[str, object] = {
            "vm": subject.name,
            "domain": subject.domain,
            "merges": subject.merges,
        }
        if fleet is not None:
            oldest, newest = fleet.taken_at
            document["index"] = {
                "built_at": fleet.built_at,
                "sketches_taken_from": oldest,
                "sketches_taken_to": newest,
            }
        click.echo(json.dumps({**document, "hosts": hosts}, indent=2))
        return
    lines = [f"{one_line(subject.name)} (trust domain {subject.domain})"]
    if fleet is not None:
        oldest, newest = fleet.taken_at
        lines.append(
            f"  from the fleet index built {_when(fleet.built_at)}: sketches taken "
            f"{_when(oldest)} to {_when(newest)}"
        )
    if not subject.merges:
        lines.append("  the policy excludes it: it saves nothing anywhere")
    lines.append(f"  {'host':<24} {'saves MiB':>10} {'shared MiB':>11} {'headroom MiB':>13}")
    for p in ranked:
        notes = ["current"] if p.current else ([] if p.fits else ["does not fit"])
        notes += [f"no merging: {p.why_not}"] if p.why_not else []
        note = f" ({'; '.join(notes)})" if notes else ""
        lines.append(
            f"  {one_line(p.host):<24} {p.saved_bytes / MIB:10.1f} {p.shared_bytes / MIB:11.1f} "
            f"{p.headroom_bytes / MIB:13.0f}{note}"
        )
    click.echo("\n".join(lines))


def _every_vm(
    hosts: tuple[str, ...], root: str, fleet: FleetIndex | None, reserve_mib: int, as_json: bool
) -> None:
    from ksmpolicy.placement.rebalance import best_hosts  # noqa: PLC0415

    reserve = reserve_mib * MIB
    if fleet is None:
        found = best_hosts(_read(hosts, root), reserve_bytes=reserve)
    else:
        found = fleet.best_hosts(reserve_bytes=reserve)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(b) for b in found], indent=2))
        return
    lines = [f"{'VM':<24} {'host':<16} {'saves MiB':>10} {'best host':<16} {'gain MiB':>9}"]
    for b in sorted(found, key=lambda b: -b.gain_bytes):
        lines.append(
            f"{one_line(b.vm):<24} {one_line(b.host):<16} {b.saved_bytes / MIB:10.1f} "
            f"{one_line(b.best_host or '-'):<16} {b.gain_bytes / MIB:9.1f}"
        )
    click.echo("\n".join(lines))


@click.command()
@HOSTS
@INDEX
@RESERVE
@click.option(
    "--max-moves", type=click.IntRange(1, 1000), default=5, show_default=True, help="At most N."
)
@click.option(
    "--min-gain-mib",
    type=click.IntRange(1, None),
    default=64,
    show_default=True,
    help="A move must add at least this much to the fleet's savings.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@ROOT
def rebalance(
    hosts: tuple[str, ...],
    index_dir: Path | None,
    reserve_mib: int,
    max_moves: int,
    min_gain_mib: int,
    as_json: bool,
    root: str,
) -> None:
    """Propose migrations that raise the fleet's savings the most (never runs them).

    Greedy: each move is the one that gains most after those before it; a VM
    shares only with its own trust domain, no host goes below --reserve-mib of
    MemAvailable, each move gains at least --min-gain-mib. Printed as `virsh
    migrate` (libvirt, by UUID) or `qm migrate` (Proxmox VE, by VMID)
    commands. Needs the fleet key (root): each sketch's seal is checked
    (--host), or the index was built under it (--index).
    """
    from ksmpolicy.placement.rebalance import rebalance as plan  # noqa: PLC0415

    fleet = _index(index_dir, hosts, root)
    limits = {
        "max_moves": max_moves,
        "reserve_bytes": reserve_mib * MIB,
        "min_gain_bytes": min_gain_mib * MIB,
    }
    moves = plan(_read(hosts, root), **limits) if fleet is None else fleet.rebalance(**limits)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "vm": m.vm.name,
                        "uuid": m.vm.uuid,
                        "vmid": m.vm.vmid,
                        "from": m.source,
                        "to": m.target,
                        "gain_bytes": m.gain_bytes,
                        "command": m.command(),
                    }
                    for m in moves
                ],
                indent=2,
            )
        )
        return
    if not moves:
        click.echo(f"no move gains {min_gain_mib} MiB or more")
        return
    total = sum(m.gain_bytes for m in moves) / MIB
    click.echo(f"# {len(moves)} moves, {total:.0f} MiB more saved in all (run them yourself):")
    for m in moves:
        click.echo(
            f"{m.command()}   # {one_line(m.vm.name)}: {m.source} -> {m.target}, "
            f"+{m.gain_bytes / MIB:.0f} MiB"
        )


def _read(hosts: tuple[str, ...], root: str) -> list[HostSketch]:
    """Each host's sketch, its seal checked under the fleet key; an old one is said."""
    from ksmpolicy.placement.document import read_sketch  # noqa: PLC0415
    from ksmpolicy.placement.sketch import load_key  # noqa: PLC0415

    key, _made = load_key(host_paths(root))
    sketches = [read_sketch(h, key) for h in hosts]
    for s in sketches:
        _say_age(s.source, s.taken_at)
    return sketches


def _index(index_dir: Path | None, hosts: tuple[str, ...], root: str) -> FleetIndex | None:
    """The fleet index in `index_dir` (None: none asked for; then --host is), refused unless
    root alone could have changed it and it was built under this host's fleet key."""
    from ksmpolicy.paths import HostPaths  # noqa: PLC0415
    from ksmpolicy.placement.fleetindex import load_index  # noqa: PLC0415
    from ksmpolicy.placement.sketch import load_key  # noqa: PLC0415

    if (index_dir is None) == (not hosts):
        raise click.UsageError("give either --host (once per host) or --index DIR")
    if index_dir is None:
        return None
    paths = host_paths(root)
    key, _made = load_key(paths)
    # a test tree under /tmp is not a host's path (as for the fleet key)
    fleet = load_index(index_dir, key.key_id, check_owner=paths.root == HostPaths().root)
    _say_age(f"the fleet index {index_dir}: its oldest sketch", fleet.taken_at[0])
    return fleet


def _say_age(what: str, taken_at: float) -> None:
    """An old sketch is said on stderr: the prediction is from what its VMs held then."""
    age = time.time() - taken_at
    if age > OLD_SECONDS:
        click.echo(
            f"note: {what} was taken {age / 3600:.1f} h ago: predicted from what its VMs held then",
            err=True,
        )
    elif age < -300:
        click.echo(f"note: {what} was taken in the future: check its clock", err=True)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
