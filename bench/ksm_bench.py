"""Benchmark: ksmpolicy's daemon against ksmtuned, the kernel's scan-time advisor and kernel
defaults, on the real ksmd, every contender on the same timeline in one run.

Workload (bench/workload): guest-like processes (lab/simguest.py) that map "guest RAM"
anonymously and mark it MADV_MERGEABLE as QEMU does, filled from an image model: pages the same
in every VM of a group (the OS image), zero pages, pages unique to the VM. Timeline: group A
starts (plus one VM the policy excludes, started with merging off like `mem-merge=off`); later
group B starts; a churn phase rewrites unique pages; group B stops; a quiet phase.

Before each contender's baseline, the workload's memory is written once and freed (this machine
is a VM whose host takes freed memory back; see `warm_memory`), so that no contender pays for
running first. Measured every 0.25 s: saved pages (pages_sharing + ksm_zero_pages), ksmd CPU
time, knobs.
Figures per contender: seconds to 90 % of the achievable savings after each group starts,
counted from the first VM's exec (what a user sees; the headline) and from the moment the last
guest of the group has filled its memory, total ksmd CPU-seconds, the savings integral (GiB*s,
time-weighted), efficiency (GiB*s per ksmd CPU-second), ksmd CPU in the quiet phase, each also as
a ratio to ksmpolicy; and the physical bound: the moment the last guest is ready plus the least
ksmd CPU-seconds any contender needed to reach 90 %, spent at ksmpolicy's CPU cap.

`--workload all_at_once=1`: every guest starts at once (a host boot, an HA failover); the
contender `ksmpolicy-no-notes` is the daemon without any hook note (it sees the VMs by the
kernel's process events). `make bench-ksm` runs both timelines.

Run `python -m bench.ksm_bench` (root; `make bench-ksm`), or `--smoke` for a short check.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.procfs import ksmd_pid, process_cpu_seconds
from ksmpolicy.paths import HostPaths
from lab.simguest import page_plan, spawn
from tests.conftest import restore_knobs, saved_knobs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench/results"
KSM = Path("/sys/kernel/mm/ksm")
PAGE = 4096
GIB = 2**30
MAX_PAGE_SHARING = 256
SAMPLE_SECONDS = 0.25


@dataclass(frozen=True)
class Workload:
    group_a: int = 4
    group_b: int = 2
    vm_mib: int = 512
    excluded_mib: int = 256
    image_percent: float = 60.0
    zero_percent: float = 10.0
    churn_pages_per_second: float = 200.0
    all_at_once: bool = False  # groups A and B (and the excluded VM) start together at 0
    b_start: float = 150.0
    churn_start: float = 210.0
    b_stop: float = 270.0
    end: float = 330.0

    def pages(self) -> tuple[int, int, int]:
        return page_plan(self.vm_mib * 256, self.image_percent, self.zero_percent)

    def achievable(self, a: int, b: int) -> int:
        """Pages KSM can save with `a` VMs of group A and `b` of group B running."""
        image, zero, _unique = self.pages()
        saved = max(a - 1, 0) * image + max(b - 1, 0) * image
        zeros = (a + b) * zero  # zero pages of all groups are one pool
        return saved + zeros - math.ceil(zeros / MAX_PAGE_SHARING)


SMOKE = Workload(
    group_a=2,
    group_b=1,
    vm_mib=24,
    excluded_mib=16,
    churn_pages_per_second=50,
    b_start=10,
    churn_start=16,
    b_stop=20,
    end=26,
)


# --- contenders ---------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    description: str
    start: Callable[[Path], list[subprocess.Popen[bytes]]]  # may return processes to stop
    needs: Callable[[], str | None] = lambda: None  # a reason it cannot run here, or None
    notes: bool = True  # a ksmpolicy daemon gets the hooks' notes (the others ignore them)


def machine_name() -> str:
    """The machine a benchmark ran on, as every results file names it."""
    return f"{platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}"


def write(name: str, value: int | str) -> None:
    (KSM / name).write_text(f"{value}\n")


def knob(name: str) -> int | str:
    text = (KSM / name).read_text().strip()
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else int(text)


def kernel_defaults(_work: Path) -> list[subprocess.Popen[bytes]]:
    write("pages_to_scan", 100)
    write("sleep_millisecs", 20)
    write("run", 1)
    return []


def flat_out(_work: Path) -> list[subprocess.Popen[bytes]]:
    """Not a policy: ksmd as fast as it goes from the start, the reference for how soon the
    guests' memory could merge at all (bench/ksm_real.py's bound)."""
    write("pages_to_scan", 5000)
    write("sleep_millisecs", 10)
    write("run", 1)
    return []


def advisor(warm: bool) -> Callable[[Path], list[subprocess.Popen[bytes]]]:
    def start(_work: Path) -> list[subprocess.Popen[bytes]]:
        write("run", 1)
        if warm:
            # A small area first: the advisor's first check then charges little CPU history.
            small = spawn("warmup", mib=16, image="warmup", image_percent=100, zero_percent=0)
            write("advisor_mode", "scan-time")
            scans = int(knob("full_scans"))
            deadline = time.monotonic() + 60
            while int(knob("full_scans")) < scans + 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            small.terminate()
            small.wait()
        else:
            write("advisor_mode", "scan-time")
        return []

    return start


def ksmtuned(sleep_msec: int | None) -> Callable[[Path], list[subprocess.Popen[bytes]]]:
    def start(work: Path) -> list[subprocess.Popen[bytes]]:
        script = fetch_ksmtuned(work)
        conf = work / "ksmtuned.conf"
        # KSM_THRES_COEF=100: the threshold is all of RAM, so ksmtuned always runs and boosts
        # (on this 24 GiB host it would otherwise never start KSM for a few GiB of guests).
        lines = ["KSM_THRES_COEF=100", f"PIDFILE={work / 'ksmtuned.pid'}"]
        if sleep_msec is not None:
            lines.append(f"KSM_SLEEP_MSEC={sleep_msec}")
        conf.write_text("\n".join(lines) + "\n")
        text = script.read_text().replace("/etc/ksmtuned.conf", str(conf))
        runnable = work / "ksmtuned"
        runnable.write_text(text)
        runnable.chmod(0o755)
        process = subprocess.Popen([str(runnable)], start_new_session=True)
        process.wait()  # it forks its loop into the background: same session, found by pgid
        return [process]

    return start


def fetch_ksmtuned(work: Path) -> Path:
    """The real script from Debian's ksmtuned package (downloaded, unpacked, not installed)."""
    cached = REPO / ".cache/ksmtuned/ksmtuned"
    if not cached.exists():
        download = work / "deb"
        download.mkdir(exist_ok=True)
        subprocess.run(
            ["apt-get", "download", "-qq", "ksmtuned"],
            cwd=download,
            check=True,
            capture_output=True,
        )
        deb = next(download.glob("ksmtuned_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(download / "x")], check=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(download / "x/usr/sbin/ksmtuned", cached)
    return cached


def ksmpolicy_daemon(work: Path) -> list[subprocess.Popen[bytes]]:
    exe = str(Path(sys.executable).parent / "ksmpolicy")
    log = (work / "ksmpolicy-daemon.log").open("wb")
    process = subprocess.Popen(
        [
            exe,
            "-p",
            str(REPO / "policies/default.yaml"),
            "daemon",
            "--no-libvirt",
            "--run-dir",
            str(work / "run"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,  # stopped with the others by process group
    )
    deadline = time.monotonic() + 20
    while not (work / "run/notify.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return [process]


def has_advisor() -> str | None:
    return None if (KSM / "advisor_mode").exists() else "this kernel has no scan-time advisor"


def has_apt() -> str | None:
    if (REPO / ".cache/ksmtuned/ksmtuned").exists() or shutil.which("apt-get"):
        return None
    return "Debian's ksmtuned package is not reachable (no apt-get)"


CONTENDERS = {
    "ksmpolicy": Contender(
        "ksmpolicy", "ksmpolicy daemon, shipped default policy", ksmpolicy_daemon
    ),
    "ksmpolicy-no-notes": Contender(
        "ksmpolicy-no-notes",
        "ksmpolicy daemon, no hook notes (process events only)",
        ksmpolicy_daemon,
        notes=False,
    ),
    "kernel-defaults": Contender("kernel-defaults", "run=1, 100 pages / 20 ms", kernel_defaults),
    "flat-out": Contender("flat-out", "reference: ksmd flat out, 5000 pages / 10 ms", flat_out),
    "ksmtuned": Contender("ksmtuned", "Debian's ksmtuned, forced to run", ksmtuned(None), has_apt),
    "ksmtuned-pve": Contender(
        "ksmtuned-pve", "ksmtuned with Proxmox's KSM_SLEEP_MSEC=100", ksmtuned(100), has_apt
    ),
    "advisor": Contender(
        "advisor", "scan-time advisor, simply enabled", advisor(False), has_advisor
    ),
    "advisor-warm": Contender(
        "advisor-warm",
        "scan-time advisor, warmed on a small area first",
        advisor(True),
        has_advisor,
    ),
}


# The standard timeline's contenders; the all-at-once one adds ksmpolicy-no-notes.
DEFAULT_CONTENDERS = "ksmpolicy,kernel-defaults,ksmtuned,ksmtuned-pve,advisor,advisor-warm"


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    contender: str
    description: str
    samples: list[dict[str, float]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    figures: dict[str, float | None] = field(default_factory=dict)
    skipped: str | None = None
    log: str = ""  # the ksmpolicy daemon's log, to see why it paced as it did
    # Real guests (bench/ksm_real.py): what ksmd saved once run to convergence after the run;
    # None: the workload's model says (Workload.achievable).
    achievable_pages: int | None = None


@contextlib.contextmanager
def ksm_restored() -> Iterator[None]:
    """Every knob a contender may write (ksmpolicy's allow-list: the pace, the advisor's,
    `use_zero_pages`, which the shipped policy sets) put back as found, as the tests do."""
    saved = saved_knobs()
    try:
        yield
    finally:
        restore_knobs(saved)


def reset_ksm() -> None:
    """Between contenders: KSM stopped with the kernel's default pace. The workload's processes
    have exited, but ksmd drops their pages from its counters only when it scans: a short fast
    run clears them (never run=2, which would unmerge every other process too)."""
    if (KSM / "advisor_mode").exists():
        write("advisor_mode", "none")
    if int(knob("pages_shared")) or int(knob("pages_sharing")):
        write("pages_to_scan", 5000)
        write("sleep_millisecs", 10)
        write("run", 1)
        deadline = time.monotonic() + 30
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = int(knob("pages_sharing")) + int(knob("pages_shared"))
            if now == 0 or (now == last and time.monotonic() - stable_since > 3):
                break
            if now != last:
                last, stable_since = now, time.monotonic()
            time.sleep(0.2)
    write("run", 0)
    write("pages_to_scan", 100)
    write("sleep_millisecs", 20)


def warm_memory(mib: int) -> None:
    """Write `mib` MiB once and free them, just before a contender's baseline. This machine is a
    VM whose host takes freed memory back (virtio-balloon free page reporting), and memory used
    again after a pause costs the host's work on first touch: the all-at-once guests (3.3 GiB)
    filled in 5.0-6.4 s after a pause of 30 s or more, in 3.0-3.9 s right after another fill or
    after this warm-up (measured here). Without it, whichever contender runs first, or after a
    long reset, pays that in its time to ready."""
    import numpy as np

    if mib > 0:
        block = np.ones(mib * 2**20, dtype=np.uint8)  # written, not merely mapped
        del block


def begin(
    contender: Contender, work: Path, warm_mib: int = 0
) -> tuple[Run, Baseline | None, list[subprocess.Popen[bytes]]]:
    """A contender's run: KSM reset, `warm_mib` of memory warmed, the baseline taken, the
    contender started (unless it cannot run here: then the run says why, and there is no
    baseline)."""
    run = Run(contender.name, contender.description)
    reason = contender.needs()
    if reason:
        run.skipped = reason
        return run, None, []
    reset_ksm()
    warm_memory(warm_mib)
    baseline = Baseline.now()
    return run, baseline, contender.start(work)


def keep_daemon_log(run: Run, work: Path) -> None:
    """The ksmpolicy daemon's log (if the contender was one), to see why it paced as it did."""
    daemon_log = work / "ksmpolicy-daemon.log"
    if daemon_log.exists():
        run.log = daemon_log.read_text()[-20000:]


def run_contender(contender: Contender, workload: Workload, work: Path) -> Run:
    footprint = (workload.group_a + workload.group_b) * workload.vm_mib + workload.excluded_mib
    run, baseline, helpers = begin(contender, work, warm_mib=footprint)
    if baseline is None:
        return run
    group_a: list[subprocess.Popen[str]] = []
    group_b: list[subprocess.Popen[str]] = []
    excluded: list[subprocess.Popen[str]] = []
    start = time.monotonic()
    try:

        def vm(name: str, image_seed: str, *, no_merge: bool = False) -> subprocess.Popen[str]:
            return spawn(
                name,
                mib=workload.excluded_mib if no_merge else workload.vm_mib,
                image=image_seed,
                image_percent=workload.image_percent,
                zero_percent=workload.zero_percent,
                no_merge=no_merge,
                churn_pages_per_second=workload.churn_pages_per_second,
                churn_on_signal=True,
                extra_args=("-enable-kvm",),
            )

        def say(event: str) -> None:
            if contender.notes:
                notify(work, event)

        run.events.append((time.monotonic() - start, "group A exec"))  # the first VM's exec
        group_a = [vm(f"a{i}", "group-a") for i in range(workload.group_a)]
        if workload.all_at_once:
            group_b = [vm(f"b{i}", "group-b") for i in range(workload.group_b)]
        excluded = [vm("db", "db", no_merge=True)]
        run.events.append((time.monotonic() - start, "group A ready"))
        say("started")
        churning = False
        b_started = workload.all_at_once
        b_stopped = False
        next_sample = time.monotonic()
        while True:
            now = time.monotonic() - start
            if now >= workload.end:
                break
            if not b_started and now >= workload.b_start:
                run.events.append((time.monotonic() - start, "group B exec"))
                group_b = [vm(f"b{i}", "group-b") for i in range(workload.group_b)]
                run.events.append((time.monotonic() - start, "group B ready"))
                say("started")
                b_started = True
            if not churning and now >= workload.churn_start:
                for process in group_a + group_b:
                    process.send_signal(signal.SIGUSR1)  # start churning (see simguest)
                run.events.append((time.monotonic() - start, "churn"))
                churning = True
            if b_started and not b_stopped and now >= workload.b_stop:
                stop_all(group_b)
                group_b = []
                run.events.append((time.monotonic() - start, "group B stops"))
                say("stopped")
                b_stopped = True
            if time.monotonic() >= next_sample:
                run.samples.append(baseline.sample(start))
                next_sample += SAMPLE_SECONDS
            time.sleep(0.02)
    finally:
        stop_all(group_a + group_b + excluded)
        stop_helpers(helpers)
        reset_ksm()
    keep_daemon_log(run, work)
    run.figures = figures(run, workload)
    return run


@dataclass(frozen=True)
class Baseline:
    """ksmd's CPU time and savings when a contender starts: samples count from there."""

    host: HostPaths
    ksmd: int | None
    cpu: float
    saved: int

    @classmethod
    def now(cls) -> Baseline:
        host = HostPaths()
        ksmd = ksmd_pid(host)
        cpu = (process_cpu_seconds(host, ksmd) or 0.0) if ksmd else 0.0
        state = read_ksm(host)
        return cls(host, ksmd, cpu, state.saved_pages if state else 0)

    def saved_pages(self) -> int:
        state = read_ksm(self.host)
        return (state.saved_pages - self.saved) if state else 0

    def sample(self, start: float) -> dict[str, float]:
        """One sample: seconds since `start`, savings and ksmd CPU since the baseline, knobs."""
        state = read_ksm(self.host)
        cpu = (process_cpu_seconds(self.host, self.ksmd) or 0.0) if self.ksmd else 0.0
        return {
            "t": round(time.monotonic() - start, 2),
            "saved_pages": (state.saved_pages - self.saved) if state else 0,
            "ksmd_cpu_seconds": round(cpu - self.cpu, 3),
            "pages_to_scan": float(state.get("pages_to_scan") or 0) if state else 0,
            "sleep_millisecs": float(state.get("sleep_millisecs") or 0) if state else 0,
            "run": float(state.get("run") or 0) if state else 0,
        }


def notify(work: Path, event: str) -> None:
    """Tell a ksmpolicy daemon (if this contender is one), as the hooks would."""
    from ksmpolicy.runtime import notify as notes

    notes.send(HostPaths(run_override=work / "run"), event, "bench")


def stop_all(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_helpers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # its own session: ksmtuned's loop too
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)


# --- figures ------------------------------------------------------------------------------------


def time_to(samples: list[dict[str, float]], since: float, level: float) -> float | None:
    for sample in samples:
        if sample["t"] >= since and sample["saved_pages"] >= level:
            return round(sample["t"] - since, 1)
    return None


def cpu_at(samples: list[dict[str, float]], t: float) -> float:
    """ksmd's CPU-seconds at the first sample at or after `t` (the last one if none is)."""
    at = next((s for s in samples if s["t"] >= t), samples[-1])
    return at["ksmd_cpu_seconds"]


def cpu_percents(samples: list[dict[str, float]]) -> list[tuple[float, float]]:
    """ksmd's CPU share (% of a core) between successive samples, with the interval's length."""
    shares = []
    for a, b in itertools.pairwise(samples):
        dt = b["t"] - a["t"]
        shares.append((dt, 100 * (b["ksmd_cpu_seconds"] - a["ksmd_cpu_seconds"]) / max(dt, 1e-6)))
    return shares


def event_times(run: Run, workload: Workload) -> dict[str, float]:
    """When each group's first VM exec'd and its last VM was ready. Runs recorded before the
    clock moved to the exec named one event per start ("group A starts", when ready)."""
    events = {name: t for t, name in run.events}
    a_ready = events.get("group A ready", events.get("group A starts", 0.0))
    b_ready = events.get("group B ready", events.get("group B starts", workload.b_start))
    return {
        "a_exec": events.get("group A exec", a_ready),
        "a_ready": a_ready,
        "b_exec": events.get("group B exec", b_ready),
        "b_ready": b_ready,
        "b_stop": events.get("group B stops", workload.b_stop),
    }


def figures(run: Run, workload: Workload) -> dict[str, float | None]:
    samples = run.samples
    if not samples:
        return {}
    at = event_times(run, workload)
    a_only = workload.achievable(workload.group_a, 0)
    both = workload.achievable(workload.group_a, workload.group_b)
    if run.achievable_pages is not None:
        a_only = both = run.achievable_pages
    # All at once: "A" is every guest together (there is no later start).
    first = both if workload.all_at_once else a_only
    t_a = time_to(samples, at["a_exec"], 0.9 * first)
    t_a_ready = time_to(samples, at["a_ready"], 0.9 * first)
    t_b = t_b_ready = None
    if not workload.all_at_once:
        before_b = max((s["saved_pages"] for s in samples if s["t"] <= at["b_exec"]), default=0)
        if both > before_b:
            level = before_b + 0.9 * (both - before_b)
            t_b = time_to(samples, at["b_exec"], level)
            t_b_ready = time_to(samples, at["b_ready"], level)
    cpu_total = samples[-1]["ksmd_cpu_seconds"]
    b_from = 0.0 if workload.all_at_once else at["b_exec"]

    def counted(sample: dict[str, float]) -> float:
        # ksmd drops an exited VM's pages from its counters only when its scan reaches it:
        # savings above what the running VMs allow are not counted.
        b_running = b_from <= sample["t"] < at["b_stop"]
        return min(sample["saved_pages"], both if b_running else a_only)

    # Time-weighted: each sample's savings held until the next sample.
    integral = (
        sum(counted(a) * (b["t"] - a["t"]) for a, b in itertools.pairwise(samples)) * PAGE / GIB
    )
    stop = at["b_stop"]
    quiet_from = stop + min(10.0, (workload.end - stop) / 2)
    quiet = [s for s in samples if s["t"] >= quiet_from]
    quiet_cpu = None
    if len(quiet) >= 2:
        quiet_cpu = (
            100
            * (quiet[-1]["ksmd_cpu_seconds"] - quiet[0]["ksmd_cpu_seconds"])
            / (quiet[-1]["t"] - quiet[0]["t"])
        )
    cpu_to_a = None
    if t_a is not None:
        cpu_to_a = round(cpu_at(samples, at["a_exec"] + t_a) - cpu_at(samples, at["a_exec"]), 3)
    # Over whole seconds: a sample taken just after another says little.
    peak_cpu = max((percent for dt, percent in cpu_percents_over(samples, 1.0)), default=None)
    return {
        "achievable_a_gib": round(a_only * PAGE / GIB, 3),
        "achievable_ab_gib": round(both * PAGE / GIB, 3),
        "seconds_to_90_a": t_a,
        "seconds_to_90_a_from_ready": t_a_ready,
        "seconds_to_90_b": t_b,
        "seconds_to_90_b_from_ready": t_b_ready,
        "ready_after_seconds": round(at["a_ready"] - at["a_exec"], 2),
        "ksmd_cpu_seconds_to_90_a": cpu_to_a,
        "ksmd_cpu_seconds": round(cpu_total, 2),
        "savings_gib_seconds": round(integral, 1),
        "efficiency_gib_seconds_per_cpu_second": round(integral / cpu_total, 1)
        if cpu_total
        else None,
        "quiet_ksmd_cpu_percent": round(quiet_cpu, 2) if quiet_cpu is not None else None,
        "peak_ksmd_cpu_percent": round(peak_cpu, 1) if peak_cpu is not None else None,
        "peak_saved_gib": round(max(s["saved_pages"] for s in samples) * PAGE / GIB, 3),
    }


def cpu_percents_over(samples: list[dict[str, float]], span: float) -> list[tuple[float, float]]:
    """ksmd's CPU share (% of a core) over windows of at least `span` seconds."""
    shares = []
    start = samples[0] if samples else None
    for sample in samples[1:]:
        assert start is not None
        dt = sample["t"] - start["t"]
        if dt >= span:
            cpu = sample["ksmd_cpu_seconds"] - start["ksmd_cpu_seconds"]
            shares.append((dt, 100 * cpu / dt))
            start = sample
    return shares


def merge_seconds(runs: list[Run], cap_percent: float) -> float | None:
    """The least ksmd CPU-seconds any contender spent to reach 90 % (the two full scans of the
    new memory), spent at the CPU cap: the soonest any pacing could merge once the guests are
    ready."""
    spent = [
        value for r in runs if (value := r.figures.get("ksmd_cpu_seconds_to_90_a")) is not None
    ]
    return min(spent) / (cap_percent / 100) if spent else None


def physical_bound(runs: list[Run], cap_percent: float) -> float | None:
    """The soonest any pacing could reach 90 % after the first exec, on the fastest guests of
    the run: the earliest any run saw its guests ready, then `merge_seconds`."""
    merge = merge_seconds(runs, cap_percent)
    ready = [value for r in runs if (value := r.figures.get("ready_after_seconds")) is not None]
    if merge is None:
        return None
    return round(min(ready, default=0.0) + merge, 1)


def own_bound(run: Run, runs: list[Run], cap_percent: float) -> float | None:
    """The same bound on the run's own guests: they filled when they did (a guest's filling
    varies by seconds between runs on two cores, whoever paces ksmd), then `merge_seconds`."""
    merge = merge_seconds(runs, cap_percent)
    ready = run.figures.get("ready_after_seconds")
    if merge is None or ready is None:
        return None
    return round(ready + merge, 1)


def shipped_cpu_cap() -> float:
    """max_ksmd_cpu_percent of the shipped default policy, the one ksmpolicy runs with here."""
    from ksmpolicy.policy.load import load_policy

    policy = load_policy(REPO / "policies/default.yaml", check_trust=False)
    return policy.reconciler.max_ksmd_cpu_percent


# --- output -------------------------------------------------------------------------------------


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference in (None, 0):
        return "-"
    return f"{value / reference:.2f}×"


def cell(run: Run, reference: dict[str, float | None], key: str) -> str:
    value = run.figures.get(key)
    if value is None:
        return "never" if key.startswith("seconds_to") else "-"
    if run.contender == "ksmpolicy" or key == "ready_after_seconds":
        return f"{value}"
    return f"{value} ({ratio(value, reference.get(key))})"


def table(runs: list[Run], bound: float | None, cap_percent: float, workload: Workload) -> str:
    ours = next((r for r in runs if r.contender == "ksmpolicy"), None)
    ref = ours.figures if ours else {}
    first = "all" if workload.all_at_once else "A"
    columns = [
        (f"{first} ready (s)", "ready_after_seconds"),
        (f"90 % after {first} starts (s)", "seconds_to_90_a"),
        ("… from ready (s)", "seconds_to_90_a_from_ready"),
    ]
    if not workload.all_at_once:
        columns += [
            ("90 % after B starts (s)", "seconds_to_90_b"),
            ("… from ready (s)", "seconds_to_90_b_from_ready"),
        ]
    columns += [
        ("ksmd CPU-s", "ksmd_cpu_seconds"),
        ("savings GiB·s", "savings_gib_seconds"),
        ("GiB·s per CPU-s", "efficiency_gib_seconds_per_cpu_second"),
        ("quiet ksmd CPU %", "quiet_ksmd_cpu_percent"),
        ("peak ksmd CPU %", "peak_ksmd_cpu_percent"),
    ]
    lines = [
        "| contender | " + " | ".join(title for title, _key in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for run in runs:
        if run.skipped:
            lines.append(
                f"| {run.contender} | skipped: {run.skipped} |" + " |" * (len(columns) - 1)
            )
            continue
        cells = [cell(run, ref, key) for _title, key in columns]
        lines.append(f"| {run.contender} | " + " | ".join(cells) + " |")
    if bound is not None:
        measured = [run for run in runs if not run.skipped]
        lines.append("")
        lines.append(
            f"Physical bound for {first}: the guests ready plus the least ksmd CPU-seconds any "
            f"contender spent to reach 90 % (two scans of the new memory) at ksmpolicy's "
            f"{cap_percent:g} % CPU cap. On the fastest guests of the run (the earliest ready "
            f"any run saw, counted from the first VM's exec) it is {bound} s; each contender's "
            "time to 90 % from the exec divided by it: "
            + ", ".join(
                f"{run.contender} {ratio(run.figures.get('seconds_to_90_a'), bound)}"
                if run.figures.get("seconds_to_90_a") is not None
                else f"{run.contender} never"
                for run in measured
            )
            + ". On each contender's own guests (its guests' ready, the column above, plus the "
            "same CPU at the cap): "
            + ", ".join(
                f"{run.contender} {ratio(run.figures.get('seconds_to_90_a'), own)} of {own} s"
                if run.figures.get("seconds_to_90_a") is not None
                and (own := own_bound(run, runs, cap_percent)) is not None
                else f"{run.contender} never"
                for run in measured
            )
            + "."
        )
    lines.append("")
    lines.append(
        "Times count from the first VM's exec (what a user sees); `… from ready` from the "
        "moment the last guest of the group had filled its memory. Ratios in parentheses are "
        "the contender's figure divided by ksmpolicy's."
    )
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (saved_ax, cpu_ax) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    for run in runs:
        if not run.samples:
            continue
        t = [s["t"] for s in run.samples]
        saved_ax.plot(t, [s["saved_pages"] * PAGE / GIB for s in run.samples], label=run.contender)
        cpu = [0.0] + [percent for _dt, percent in cpu_percents(run.samples)]
        cpu_ax.plot(t, cpu, label=run.contender, linewidth=0.8)
    first = next((r for r in runs if r.events), None)
    for when, name in first.events if first else []:
        for ax in (saved_ax, cpu_ax):
            ax.axvline(when, color="grey", linestyle=":", linewidth=0.8)
        saved_ax.text(when, saved_ax.get_ylim()[1] * 0.98, f" {name}", fontsize=8, va="top")
    saved_ax.set_ylabel("saved (GiB)")
    cpu_ax.set_ylabel("ksmd CPU (% of a core)")
    cpu_ax.set_xlabel("seconds")
    saved_ax.legend(loc="lower right", fontsize=8)
    saved_ax.set_title("KSM savings and ksmd CPU, same workload for every contender")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_workload(base: Workload, settings: list[str]) -> Workload:
    """`--workload vm_mib=1024 --workload group_a=8`: any Workload field, by name."""
    values: dict[str, float | int] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or key not in Workload.__dataclass_fields__:
            names = ", ".join(Workload.__dataclass_fields__)
            raise SystemExit(
                f"ksm_bench: --workload {setting!r}: use KEY=VALUE, KEY one of {names}"
            )
        kind = type(getattr(base, key))
        if kind is bool:
            values[key] = text.lower() in ("1", "true", "yes", "on")
            continue
        try:
            values[key] = kind(text)
        except ValueError:
            message = f"ksm_bench: --workload {key}: {text!r} is not a {kind.__name__}"
            raise SystemExit(message) from None
    return replace(base, **values)  # type: ignore[arg-type]  # each value has its field's type


def write_results(out: Path, name: str, result: dict[str, object], runs: list[Run]) -> str:
    """NAME.json, NAME.md and NAME.png under `out`; returns the table."""
    bound, cap = result["physical_bound_seconds"], result["cpu_cap_percent"]
    assert isinstance(cap, float) and (bound is None or isinstance(bound, float))
    workload = Workload(**result["workload"])  # type: ignore[arg-type]
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(runs, bound, cap, workload)
    plotted = plot(runs, out / f"{name}.png")
    (out / f"{name}.md").write_text(
        f"# KSM pacing benchmark ({name})\n\nWorkload: {result['workload']}. "
        f"Machine: {result['machine']}.\n\n"
        + text
        + (f"\n\n![savings and ksmd CPU]({name}.png)\n" if plotted else "\n")
    )
    return text


def render(path: Path, out: Path, name: str) -> int:
    """Recompute the figures, the table and the plot of a recorded run from its samples."""
    result = json.loads(path.read_text())
    if "cpu_cap_percent" not in result:
        print(f"ksm_bench: {path} records no CPU cap for ksmpolicy (an older run)", file=sys.stderr)
        return 2
    workload = Workload(**result["workload"])
    runs = []
    for recorded in result["runs"]:
        run = Run(
            recorded["contender"],
            recorded["description"],
            recorded["samples"],
            [(when, event) for when, event in recorded["events"]],
            skipped=recorded["skipped"],
            log=recorded["log"],
            achievable_pages=recorded.get("achievable_pages"),
        )
        run.figures = figures(run, workload) if not run.skipped else {}
        runs.append(run)
    cap = float(result["cpu_cap_percent"])
    result.pop("two_scan_bound_seconds", None)
    result["physical_bound_seconds"] = physical_bound(runs, cap)
    result["runs"] = [asdict(r) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    print(write_results(out, name, result, runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, two contenders")
    parser.add_argument("--contenders", help="comma-separated subset of " + ",".join(CONTENDERS))
    parser.add_argument(
        "--workload",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one workload parameter (e.g. vm_mib=1024, group_a=8, b_start=120)",
    )
    parser.add_argument("--name", default=None, help="results name (bench/results/NAME.*)")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="no run: recompute figures, table and plot from a recorded NAME.json",
    )
    args = parser.parse_args(argv)
    name = args.name or ("smoke" if args.smoke else "ksm")
    out = Path(args.out)
    if args.render:
        return render(Path(args.render), out, args.name or Path(args.render).stem)
    if os.geteuid() != 0:
        print("ksm_bench: needs root (it drives /sys/kernel/mm/ksm)", file=sys.stderr)
        return 2
    from ksmpolicy.kernel.controllers import daemon_pids
    from ksmpolicy.kernel.procfs import processes_named

    rivals = daemon_pids(HostPaths()) + processes_named(HostPaths(), ["ksmtuned"])
    if rivals:
        # Another controller would write the knobs under every contender.
        print(
            f"ksm_bench: KSM controllers already run (pids {rivals}): stop them first",
            file=sys.stderr,
        )
        return 2
    workload = parse_workload(SMOKE if args.smoke else Workload(), args.workload)
    names = (
        args.contenders or ("ksmpolicy,kernel-defaults" if args.smoke else DEFAULT_CONTENDERS)
    ).split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        print(f"ksm_bench: unknown contender(s) {unknown}: use {list(CONTENDERS)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    # The tests' lock: one user of the real ksmd at a time.
    lock = (Path(tempfile.gettempdir()) / "ksmpolicy-tests-ksm.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    with ksm_restored(), tempfile.TemporaryDirectory(prefix="ksm-bench-") as tmp:
        for contender in names:
            work = Path(tmp) / contender
            work.mkdir()
            print(f"== {contender}", flush=True)
            run = run_contender(CONTENDERS[contender], workload, work)
            print(json.dumps(run.figures or {"skipped": run.skipped}), flush=True)
            runs.append(run)
    cap = shipped_cpu_cap()
    result: dict[str, object] = {
        "machine": machine_name(),
        "workload": asdict(workload),
        "physical_bound_seconds": physical_bound(runs, cap),
        "cpu_cap_percent": cap,
        "runs": [asdict(r) for r in runs],
    }
    print(write_results(out, name, result, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
