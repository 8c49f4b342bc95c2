"""The reconciler daemon: observe the host, plan ksmd's pace, write the knobs; react to hooks."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ksmpolicy import __version__
from ksmpolicy.control import sdnotify
from ksmpolicy.control.law import History, LawSettings, Plan, plan
from ksmpolicy.control.observe import Observer
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel.controllers import Controller, other_controllers
from ksmpolicy.kernel.ksm import KsmKnobs
from ksmpolicy.kernel.procevents import ProcEvents, open_events, starts_unmergeable, worth_a_look
from ksmpolicy.kernel.procfs import effective_uid
from ksmpolicy.kernel.scan import ProcessScanner, trusted_uid
from ksmpolicy.paths import PAGE_SIZE, HostPaths, default_policy
from ksmpolicy.policy.load import BUILTIN_NAME, load_policy_or_builtin
from ksmpolicy.policy.model import Policy
from ksmpolicy.runtime.alive import ALIVE_EVERY, Alive, alive_path, remove_alive, write_alive
from ksmpolicy.runtime.notify import Listener

log = logging.getLogger(__name__)
SPRINT_INTERVAL_SECONDS = 0.5  # re-plan this often while sprinting: ksmd's cost per page moves fast
# After a VMM execs, its memory becomes mergeable within moments (QEMU madvises guest RAM as it
# sets it up): look every WATCH_FAST seconds for the first WATCH_FAST_FOR, then every half second
# until WATCH_SECONDS. A look is a /proc scan of the processes already known plus the new one.
WATCH_SECONDS, WATCH_FAST_FOR, WATCH_FAST = 5.0, 1.0, 0.05
CONTROLLERS_EVERY = 1.0  # seconds between looks for other controllers of the knobs
STARTS = ("started", "reconnect", "changed")  # notes that mean new mergeable memory


class Reconciler:
    """One observe -> plan -> write step at a time; the daemon loop calls `step`."""

    def __init__(self, paths: HostPaths, policy: Policy, *, dry_run: bool = False) -> None:
        self.paths = paths
        self.policy = policy
        self.dry_run = dry_run
        self.knobs = KsmKnobs(paths)
        self.observer = Observer(paths, ProcessScanner(paths))
        self.history = History()
        self.last_plan: Plan | None = None

    def seed(self) -> None:
        """For a single pass: start the history from what is there now (footprint, ksmd's
        counters), so that memory already present is not taken for new memory and no sprint
        is planned that no later pass would end."""
        obs = self.observer.observe()
        self.history = History(
            time=obs.time,
            ksmd_cpu_seconds=obs.ksmd_cpu_seconds,
            pages_scanned=obs.pages_scanned,
            footprint_pages=obs.footprint_pages,
            last_full_scans=obs.full_scans,
            saved_at_last_full_scan=obs.saved_pages,
        )

    @property
    def settings(self) -> LawSettings:
        return LawSettings.from_policy(self.policy.reconciler)

    def step(self, *, notes: int = 0, write: bool = True) -> Plan:
        """Observe, plan, and (unless dry-run, or `write` is False: passive) write the knobs."""
        observation = self.observer.observe(notes=notes)
        result = plan(observation, self.settings, self.history)
        self.history = result.history
        previous = self.last_plan
        if previous is None or (previous.mode, previous.knobs) != (result.mode, result.knobs):
            cpu = self.history.cpu_percent
            log.info(
                "%s: %s [footprint %.0f MiB, saved %.0f MiB, ksmd %s]",
                result.mode,
                result.reason,
                observation.footprint_pages * PAGE_SIZE / 2**20,
                observation.saved_pages * PAGE_SIZE / 2**20,
                "cpu n/a" if cpu is None else f"{cpu:.1f}% cpu",
            )
        if write and not self.dry_run:
            self.knobs.apply(result.knobs)
        self.last_plan = result
        return result


@dataclass(frozen=True)
class DaemonOptions:
    """How the daemon runs: `ksmpolicy daemon`'s options."""

    restore_on_exit: bool = False  # put back the knobs found at start
    dry_run: bool = False  # plan and log, write no knob
    libvirt_uri: str | None = None
    use_libvirt: bool = True  # watch libvirt's events (rewrite definitions, switch live)
    metrics: str | None = None  # [HOST:]PORT to serve /metrics on
    sketch_every: float | None = None  # seconds between the sketches served at /sketch
    policy_explicit: bool = True  # the policy file was named (else the default, looked up)
    take_over: bool = False  # stop ksmtuned / turn the advisor off instead of staying passive
    use_events: bool = True  # the kernel's process events (else polling)


class Daemon:
    """The loop: plan every interval (every half second while sprinting) and at once on a note."""

    def __init__(
        self, paths: HostPaths, policy_path: str, options: DaemonOptions | None = None
    ) -> None:
        options = options or DaemonOptions()
        self.paths = paths
        self.policy_path = policy_path
        # Not named (no --policy, no $KSMPOLICY_POLICY): the default path, looked up again on
        # each reload, and the built-in default while no file is there.
        self.policy_explicit = options.policy_explicit
        # Other controllers of the knobs: passive while one runs, unless told to take over.
        self.take_over = options.take_over
        self.passive: str | None = None
        self._pace: str | None = None  # the last plan, for status (runtime/alive.py)
        self._replan_now = False  # a reloaded policy asks for a look at once
        self._owns_knobs = False  # written a knob: an advisor seen on now is its own doing
        self._next_alive = 0.0
        self._said_once: set[str] = set()
        self._next_controllers = 0.0  # when to look for other controllers again
        self.restore_on_exit = options.restore_on_exit
        self.libvirt_uri = options.libvirt_uri
        self.use_libvirt = options.use_libvirt and not options.dry_run
        self.enforcer: Any = None
        self.metrics = options.metrics
        self.sketch_every = options.sketch_every
        self.reconciler = Reconciler(paths, self._load_policy(), dry_run=options.dry_run)
        self._signals: list[int] = []
        self.keeper: Any = None  # control.keeper.Keeper, under trust domains
        self._said: dict[str, float] = {}
        self.last_audit: Any = None  # report.audit.Audit
        self._next_audit = 0.0
        # The kernel's process events: a VMM seen the moment it execs (else: polling).
        self.events: ProcEvents | None = None
        self.discovery = "polling"
        self.use_events = options.use_events
        self._looked_at: dict[int, str] = {}  # pids seen exec'ing: their exit re-plans too
        self._watch_until = 0.0  # after such an exec, look often while its memory appears

    def run(self, *, max_seconds: float | None = None) -> None:
        listener = Listener(self.paths)
        self._open_events()
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_write.fileno())
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        watchdog = sdnotify.watchdog_seconds()
        if self.use_libvirt:
            self.enforcer = self._start_enforcer(wake_write)
        if self.metrics:
            from ksmpolicy.report.metrics import StatusCollector, serve  # noqa: PLC0415

            collector = StatusCollector(
                self.paths,
                lambda: self.reconciler.policy,
                reconciler=self.reconciler,
                keeper=lambda: self.keeper,
            )
            from ksmpolicy.placement.publish import Published  # noqa: PLC0415

            routes = Published.routes(self.paths, lambda: self.reconciler.policy, self.sketch_every)
            try:
                url = serve(collector, self.metrics, routes)
            except (ValueError, OSError) as exc:
                raise KsmPolicyError(f"cannot serve metrics on {self.metrics}: {exc}") from None
            log.info("metrics on %s", url)
        log.info(
            "started: ksmpolicy %s, policy %s, notes on %s, pid %d",
            __version__,
            self._policy_name(),
            listener.path,
            os.getpid(),
        )
        try:
            self._loop(listener, wake_read, deadline, watchdog)
        finally:
            sdnotify.notify("STOPPING=1")
            listener.close()
            if self.events is not None:
                self.events.close()
            if self.enforcer is not None:
                self.enforcer.close()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            wake_read.close()
            wake_write.close()
            remove_alive(self.paths)
            if self.restore_on_exit and not self.reconciler.dry_run and self._owns_knobs:
                self.reconciler.knobs.restore()
                log.info("restored the KSM knobs found at start")
            log.info("stopped")

    def _loop(
        self,
        listener: Listener,
        wake: socket.socket,
        deadline: float | None,
        watchdog: float | None,
    ) -> None:
        """Wait for something to happen (a note, a process event, a libvirt event, a signal,
        or the next plan's time); gather what happened; plan when asked or due."""
        next_plan = next_ping = time.monotonic()
        ready_sent = False
        notes = 0  # VMs that started since the last plan
        replan = False  # a note or event asks for a plan now
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            wakeups = [next_plan, *([next_ping] if watchdog is not None else [])]
            readable = self._wait(listener, wake, min([*wakeups, deadline or next_plan]) - now)
            if not self._handle_signals():
                return
            started, changed = self._gather(listener, readable)
            notes += started
            replan = replan or changed
            if replan or time.monotonic() >= next_plan:
                next_plan = time.monotonic() + self._plan(notes)
                notes, replan = 0, False
                if not ready_sent:
                    sdnotify.notify("READY=1")
                    ready_sent = True
            if watchdog is not None and time.monotonic() >= next_ping:
                sdnotify.notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog

    def _wait(self, listener: Listener, wake: socket.socket, timeout: float) -> set[int]:
        """The file descriptors that became readable within `timeout` seconds (a signal wakes
        it through `wake`, which is drained here)."""
        fds = [listener.fileno(), wake.fileno()]
        if self.events is not None:
            fds.append(self.events.fileno())
        readable, _, _ = select.select(fds, [], [], max(0.0, timeout))
        if wake.fileno() in readable:
            while True:
                try:
                    wake.recv(64)
                except BlockingIOError:
                    break
        return set(readable)

    def _handle_signals(self) -> bool:
        """SIGHUP reloads the policy (and asks for a look at once); any other signal ends the
        loop (False)."""
        # Swap the list out before acting on it: a signal that arrives while the loop runs
        # lands in the new list and is seen on the next round, never cleared unseen.
        received, self._signals = self._signals, []
        for signum in received:
            if signum != signal.SIGHUP:
                log.info("received %s", signal.Signals(signum).name)
                return False
            self.reload()
            self._replan_now = True  # a new policy may move VMs between domains
        return True

    def _gather(self, listener: Listener, readable: set[int]) -> tuple[int, bool]:
        """(VMs that started: each makes the law sprint; whether to plan at once)."""
        started, replan = 0, self._replan_now
        self._replan_now = False
        if self.events is not None and self.events.fileno() in readable:
            execs, exited = self._process_events()
            started += execs
            replan = replan or execs > 0 or exited
        if listener.fileno() in readable:
            received = listener.receive()
            for note in received:
                log.info("hook: %s %s", note.vm, note.event)
            # Only new mergeable memory calls for a sprint; a stop just re-plans at once.
            started += sum(
                note.event in STARTS and not self._starts_unmergeable(note.vm) for note in received
            )
            replan = replan or bool(received)
        if self.enforcer is not None:
            names, changes = self.enforcer.handle(self.reconciler.policy)
            started += sum(not self._starts_unmergeable(name) for name in names)
            replan = replan or changes > 0
        return started, replan

    def _starts_unmergeable(self, vm: str) -> bool:
        """A VM a hook said started whose QEMU (found by libvirt's or qemu-server's PID file)
        runs with mem-merge=off: no sprint for it."""
        if not vm or "/" in vm or vm.startswith("."):
            return False
        for pidfile in (self.paths.libvirt_pidfile(vm), self.paths.pve_pidfile(vm)):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            return starts_unmergeable(str(self.paths.proc), pid)
        return False

    def _plan(self, notes: int) -> float:
        """Keep the trust domains, plan the pace and write the knobs (unless passive); say
        so. Returns the seconds until the next plan."""
        self.passive = self._other_controllers()
        if self.passive is None:
            notes += self._keep_domains()
        result = self.reconciler.step(notes=notes, write=self.passive is None)
        self._pace = f"{result.mode}: {result.reason}"
        self._owns_knobs = self._owns_knobs or self.passive is None
        self._say_alive()
        interval = self.reconciler.policy.reconciler.interval_seconds
        if result.mode in ("settle", "sprint") or time.monotonic() < self._watch_until:
            interval = min(interval, SPRINT_INTERVAL_SECONDS)
        if time.monotonic() < self._watch_until - WATCH_SECONDS + WATCH_FAST_FOR:
            interval = min(interval, WATCH_FAST)
        return interval

    def _keep_domains(self) -> int:
        """Trust domains and merge scopes, before the pace is planned; returns how many VMs
        were switched on (new mergeable memory: the law sprints)."""
        policy = self.reconciler.policy
        if self.reconciler.dry_run or not (
            policy.uses_domains or policy.isolation.merge_across_nodes is not None
        ):
            return 0
        from ksmpolicy.control.keeper import Keeper, keep_merge_scope, toggle_vm  # noqa: PLC0415
        from ksmpolicy.control.rivals import Rivals  # noqa: PLC0415
        from ksmpolicy.inventory import take  # noqa: PLC0415
        from ksmpolicy.trust.scopes import read_host  # noqa: PLC0415

        try:
            host = keep_merge_scope(
                self.paths, self.reconciler.knobs, policy, read_host(self.paths), self._said
            )
            if not policy.uses_domains:
                return 0
            if self.keeper is None:
                conn = lambda: self.enforcer.conn if self.enforcer is not None else None  # noqa: E731
                rivals = Rivals(
                    self.paths,
                    use_zero_pages=lambda: self.reconciler.policy.reconciler.use_zero_pages,
                )
                self.keeper = Keeper(self.paths, toggle_vm(self.paths, conn), rivals=rivals)
            scanner = self.reconciler.observer.scanner
            vms = take(self.paths, policy, scanner=scanner).vms
            look = self.keeper.look(policy, vms, host)
            self._audit(policy)
        except (KsmPolicyError, OSError, TimeoutError) as exc:
            log.error("trust domains: %s", exc)
            return 0
        return len(look.switched_on)

    def _audit(self, policy: Policy) -> None:
        """The page-map audit, every `isolation.audit_interval_seconds` and never more than
        1 % of a core (100 times its last CPU cost apart). Says when pages cross a domain
        boundary, with the VMs, and when they no longer do."""
        from ksmpolicy.kernel.pagemap import PageMapUnavailable  # noqa: PLC0415
        from ksmpolicy.report.audit import audit, violation_line  # noqa: PLC0415

        now = time.monotonic()
        if now < self._next_audit:
            return
        try:
            found = audit(self.paths, policy, scanner=self.reconciler.observer.scanner)
        except PageMapUnavailable as exc:
            log.warning("audit: the page map cannot be read: %s", exc)
            self._next_audit = now + 3600
            return
        gap = max(policy.isolation.audit_interval_seconds, 100 * found.cpu_seconds)
        self._next_audit = now + gap
        crossing = found.cross_domain_pages + found.cross_domain_zero_pages
        if crossing:
            pairs = "; ".join(
                f"{violation_line(v)}: {v.shared_pages + v.zero_pages}"
                for v in found.violations[:10]
            )
            log.error("audit: %d KSM pages mapped across trust domains: %s", crossing, pairs)
        elif self.last_audit is not None and not self.last_audit.ok:
            log.info("audit: no KSM page is mapped across trust domains any more")
        self.last_audit = found

    def _start_enforcer(self, wake: socket.socket) -> Any:
        """The libvirt event watcher, when libvirt is here; the daemon is fine without it."""
        from ksmpolicy.libvirt.events import Enforcer  # noqa: PLC0415
        from ksmpolicy.libvirt.host import LibvirtMissing  # noqa: PLC0415

        def poke() -> None:
            with contextlib.suppress(OSError):  # a full wake pipe already wakes the loop
                wake.send(b"l")

        try:
            enforcer = Enforcer.watching(self.libvirt_uri, poke, self.paths.backup_dir)
        except LibvirtMissing:
            log.info("libvirt-python not installed: libvirt event watcher off")
            return None
        except KsmPolicyError as exc:
            log.info("libvirt event watcher off: %s", exc)
            return None
        enforcer.catch_up(self.reconciler.policy)
        log.info("watching libvirt events at %s", self.libvirt_uri or "the default URI")
        return enforcer

    def reload(self) -> None:
        """SIGHUP: load the policy again; a bad one keeps the old and says why."""
        sdnotify.notify("RELOADING=1")
        self._next_controllers = 0.0  # a new policy may want the advisor: look again at once
        try:
            self.reconciler.policy = self._load_policy()
        except KsmPolicyError as exc:
            log.error("reload failed, keeping the previous policy: %s", exc)
        else:
            log.info("reloaded policy %s", self._policy_name())
        sdnotify.notify("READY=1")

    def _load_policy(self) -> Policy:
        if not self.policy_explicit:
            self.policy_path = default_policy(self.paths)
        return load_policy_or_builtin(self.policy_path, explicit=self.policy_explicit)

    def _policy_name(self) -> str:
        source = self.reconciler.policy.source
        return source if source.startswith(BUILTIN_NAME) else self.policy_path

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _open_events(self) -> None:
        if not self.use_events:
            self.discovery = "polling (process events off: --no-process-events)"
            return
        try:
            self.events = open_events()
        except OSError as exc:
            self.discovery = (
                f"polling every interval (the kernel's process events are unavailable: "
                f"{exc.strerror or exc}; they need root and CONFIG_PROC_EVENTS)"
            )
            log.warning("%s", self.discovery)
            return
        self.discovery = "process events (proc connector)"
        log.info("new VMMs are seen when they exec (the kernel's process events)")

    def _process_events(self) -> tuple[int, bool]:
        """(exec'd VMMs and mergeable processes: each counts as a hook note, so the law
        sprints; whether one of those exited: that re-plans at once)."""
        assert self.events is not None
        started, exited = 0, False
        for event in self.events.read():
            if event.kind == "exit":
                exited = self._looked_at.pop(event.pid, None) is not None or exited
                continue
            self.reconciler.observer.scanner.forget(event.pid)  # who it was is not who it is
            what = worth_a_look(str(self.paths.proc), event.pid)
            if what is None:
                continue
            if not trusted_uid(effective_uid(self.paths.proc / str(event.pid))):
                # Anyone may exec a binary named like a VMM, as often as they like: a sprint
                # for it would spend ksmd's CPU (no user's cgroup pays for that) at their
                # word. The regular scan still finds a real one (jailer's Firecracker).
                log.debug(
                    "exec: pid %d (%s) not run by root or libvirt's QEMU user", event.pid, what
                )
                continue
            self._looked_at[event.pid] = what
            if starts_unmergeable(str(self.paths.proc), event.pid):
                log.info(
                    "exec: pid %d (%s), started with mem-merge=off: no sprint", event.pid, what
                )
                continue
            log.info("exec: pid %d (%s)", event.pid, what)
            self._watch_until = time.monotonic() + WATCH_SECONDS
            started += 1
        return started, exited

    def _other_controllers(self) -> str | None:
        """Why the daemon must not write the knobs now (another controller runs), or None.
        Said once per set of controllers, with the fix; with --take-over, stops what it can.
        Looked for at most every CONTROLLERS_EVERY seconds (two walks of /proc): not at each
        of the quick looks of a sprint or after a VMM's exec."""
        now = time.monotonic()
        if now < self._next_controllers:
            return self.passive
        self._next_controllers = now + CONTROLLERS_EVERY
        policy = self.reconciler.policy
        found = other_controllers(
            self.paths,
            own_pids=(os.getpid(),),
            # an advisor on before the daemon wrote anything is someone else's; later it is ours
            advisor_wanted=policy.reconciler.kernel_advisor or self._owns_knobs,
        )
        for boot in (c for c in found if not c.running):
            self._say_once(
                f"controller {boot.name}",
                f"{boot.name}: {boot.detail}; ksmpolicy sets the knobs after it, but it acts "
                f"whenever ksmpolicy does not run: {boot.fix}",
            )
        running = [c for c in found if c.running]
        if self.take_over and not self.reconciler.dry_run:
            running = [c for c in running if not self._take_over(c)]
        if not running:
            if self.passive is not None:
                log.info("no other controller of the KSM knobs now: ksmpolicy sets them")
            return None
        why = "; ".join(f"{c.name} ({c.detail}): {c.fix}" for c in running)
        if why != self.passive:
            hint = "" if any(c.take_over is None for c in running) else " (or --take-over)"
            log.warning(
                "passive: another controller sets the KSM knobs; ksmpolicy writes none until "
                "it is gone%s: %s",
                hint,
                why,
            )
        return why

    def _take_over(self, controller: Controller) -> bool:
        """Do what --take-over promises for one controller; True when it is dealt with."""
        if controller.take_over is None:
            return False
        try:
            if controller.name == "ksmtuned":
                os.kill(int(controller.detail.removeprefix("pid ")), signal.SIGTERM)
            elif controller.name == "kernel advisor":
                self.reconciler.knobs.apply([("advisor_mode", "none")])
            else:
                return False
        except (OSError, ValueError, KsmPolicyError) as exc:
            log.error("--take-over: %s: %s", controller.name, exc)
            return False
        log.warning(
            "--take-over: %s (%s): %s", controller.name, controller.detail, controller.take_over
        )
        return True

    def _say_alive(self) -> None:
        now = time.monotonic()
        if now < self._next_alive:
            return
        self._next_alive = now + ALIVE_EVERY
        alive = Alive(
            pid=os.getpid(),
            time=time.time(),
            interval=self.reconciler.policy.reconciler.interval_seconds,
            policy=self._policy_name(),
            passive=self.passive,
            discovery=self.discovery,
            pace=self._pace,
            version=__version__,
        )
        try:
            write_alive(self.paths, alive)
        except OSError as exc:
            self._say_once("alive", f"cannot write {alive_path(self.paths)}: {exc}")

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said_once:
            self._said_once.add(key)
            log.warning("%s", message)
