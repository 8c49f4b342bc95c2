"""The Proxmox VE hookscript: `ksmpolicy-hook VMID PHASE` -> what to do, and the exit code.

Proxmox aborts a start when the hookscript fails at pre-start and only warns at the other
phases; what it prints goes to the task log. pre-start runs under the VM's config lock with the
config already loaded, so a config change made then would only affect the next start: the
decision is applied to the running VM at post-start (QMP), and written to the config in the
background once the lock is released (`qm set`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ksmpolicy import hookcore
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.paths import HostPaths, default_policy
from ksmpolicy.policy.model import Action, Policy

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from typing import IO

    from ksmpolicy.policy.decide import Decision
    from ksmpolicy.proxmox.conf import PveFacts

PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")
QMP_TIMEOUT_SECONDS = 3.0  # the live switch at post-start, within the hook's 5 s deadline
CHAINED_TIMEOUT_SECONDS = 600


class ProxmoxHook:
    def __init__(
        self,
        vmid: str,
        policy_path: str | None,
        *,
        root: str = "/",
        run_dir: str | None = None,
        qm: str = "qm",
    ) -> None:
        self.vmid = vmid
        self.paths = HostPaths(Path(root), Path(run_dir) if run_dir else None)
        self.policy_path = policy_path or default_policy(self.paths)
        self.root = root
        self.qm = qm
        self.session = hookcore.Session(
            f"VM {vmid!r}" if not vmid.isdigit() else f"VM {vmid}",
            self.policy_path,
            str(self.paths.run_dir),
        )

    def run(self, phase: str, out: IO[str], err: IO[str]) -> int:
        from ksmpolicy.proxmox.node import valid_vmid  # noqa: PLC0415

        try:
            valid_vmid(self.vmid)
        except KsmPolicyError as exc:
            hookcore.report(err, f"ksmpolicy: hookscript called for {exc}", "err")
            if phase == "pre-start":
                return self.session.unusable_policy_status()
            return 0
        chained = self.chained(phase, out, err)
        if chained != 0 and phase == "pre-start":
            return chained  # the other hookscript refused the start: so do we
        if phase == "pre-start":
            self.session.vm_key = self.vmid  # what pre-start says is kept for `status`
            status = hookcore.run(self.session, self.pre_start, out, err)
        elif phase == "post-start":
            self.notify("started")
            status = hookcore.run(self.session, self.post_start, out, err)
        elif phase == "post-stop":
            self.notify("stopped")
            status = 0
        else:
            status = 0
        return chained or status

    # --- phases

    def pre_start(self) -> int:
        fix = f"ksmpolicy apply --proxmox --vmid {self.vmid}"

        def evaluate(policy: Policy) -> hookcore.StartCheck:
            facts, decision, note = self.evaluate(policy)
            advice = f"It is switched at post-start; to persist now: {fix}"
            drift = verdict(self.vmid, facts, decision)
            return hookcore.StartCheck(decision, drift, fix, advice, note)

        return self.session.check_start(f"VM {self.vmid}", evaluate)

    def post_start(self) -> int:
        """Switch the running VM to its decision; persist it later. Only ever warns."""
        from ksmpolicy.kernel.qmp import set_merge_on_socket  # noqa: PLC0415

        session = self.session
        policy = session.load_policy()
        if policy is None:
            return 0
        try:
            facts, decision, _note = self.evaluate(policy)
            # The config first (in the background, once the start's lock is released): a live
            # switch that fails must not keep the decision out of the config.
            if verdict(self.vmid, facts, decision) is not None:
                self.spawn_persist()
            if policy.live and facts.vm.ram_can_merge:
                merge = decision.action is Action.MERGE
                pid = None
                if policy.uses_domains and merge:
                    merge, pid = self.admit(decision)
                socket = str(self.paths.qmp_socket(self.vmid))
                changed = set_merge_on_socket(
                    socket, merge, timeout=QMP_TIMEOUT_SECONDS, expect_pid=pid
                )
                if changed:
                    state = "on" if merge else "off"
                    line = f"ksmpolicy: VM {self.vmid}: merging switched {state} live"
                    session.report(line, "info")
        except KsmPolicyError as exc:
            session.report(f"ksmpolicy: VM {self.vmid}: post-start: {exc}", "warning")
        except Exception as exc:  # post-start failures only warn in Proxmox: say so and go on
            message = f"ksmpolicy: VM {self.vmid}: internal error at post-start: {exc}"
            session.report(message, "warning")
        return 0

    def admit(self, decision: Decision) -> tuple[bool, int | None]:
        """Under trust domains: may this VM merge now (its domain holds, or may claim, every
        merge scope it counts in)? (merge, its QEMU's PID)."""
        from ksmpolicy.kernel.procfs import start_ticks  # noqa: PLC0415
        from ksmpolicy.trust.scopes import (  # noqa: PLC0415
            guest_ram_ranges,
            process_nodes,
            read_host,
        )
        from ksmpolicy.trust.state import Member, admit  # noqa: PLC0415

        pid = self.qemu_pid()
        start = start_ticks(self.paths, pid) if pid is not None else None
        if pid is None or start is None:
            raise KsmPolicyError("its QEMU process is not found: merging stays off")
        host = read_host(self.paths)
        nodes = None
        if host.per_node:
            ram = guest_ram_ranges(self.paths, pid, self.ram_bytes(pid))
            nodes = process_nodes(self.paths, pid, ram)
        member = Member(pid, start, f"VM {self.vmid}", decision.domain, host.scopes_of(nodes))
        import time  # noqa: PLC0415

        try:
            merge, why = admit(self.paths, member, time.time())
        except TimeoutError:
            merge, why = False, "the domain state is busy: the daemon decides"
        level = "info"
        self.session.report(f"ksmpolicy: VM {self.vmid}: {why}", level)
        return merge, pid

    def ram_bytes(self, pid: int) -> int | None:
        """Guest RAM from the QEMU command line (`-m`)."""
        from ksmpolicy.kernel.vmm import parse_qemu_cmdline  # noqa: PLC0415

        try:
            raw = (self.paths.proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return None
        return parse_qemu_cmdline([a.decode("utf-8", "replace") for a in raw.split(b"\0") if a])[3]

    def qemu_pid(self) -> int | None:
        """The running QEMU's PID, from Proxmox's pid file."""
        try:
            text = self.paths.pve_pidfile(self.vmid).read_text()
            return int(text.strip())
        except (OSError, ValueError):
            return None

    # --- shared

    def evaluate(self, policy: Policy) -> tuple[PveFacts, Decision, str | None]:
        from ksmpolicy.policy.decide import Decider  # noqa: PLC0415
        from ksmpolicy.proxmox.node import read_config, uses_allow_ksm  # noqa: PLC0415
        from ksmpolicy.proxmox.rewrite import apply_policy  # noqa: PLC0415

        text = read_config(self.paths, self.vmid)
        _new, facts, decision, note = apply_policy(
            text, self.vmid, Decider(policy), use_allow_ksm=uses_allow_ksm(policy)
        )
        return facts, decision, note

    def chained(self, phase: str, out: IO[str], err: IO[str]) -> int:
        """Run the hookscript that was attached before ours, with the same arguments."""
        from ksmpolicy.proxmox.hookscript import (  # noqa: PLC0415
            is_our_volume,
            previous_hookscript,
            volume_path,
        )

        previous = previous_hookscript(self.paths, self.vmid)
        if previous is None:
            return 0
        if is_our_volume(self.paths, previous):
            line = f"ksmpolicy: VM {self.vmid}: the chained hookscript {previous} is ours: skipped"
            hookcore.report(err, line, "warning")
            return 0
        try:
            script = volume_path(self.paths, previous)
            result = subprocess.run(
                [str(script), self.vmid, phase], check=False, timeout=CHAINED_TIMEOUT_SECONDS
            )
        except (KsmPolicyError, OSError, subprocess.TimeoutExpired) as exc:
            line = f"ksmpolicy: VM {self.vmid}: chained hookscript {previous}: {exc}"
            hookcore.report(err, line, "err")
            return 1
        return result.returncode

    def notify(self, event: str) -> None:
        from ksmpolicy.runtime.notify import send  # noqa: PLC0415

        send(self.paths, event, self.vmid)

    def spawn_persist(self) -> None:
        from ksmpolicy.proxmox.node import spawn_persist  # noqa: PLC0415

        argv = [sys.executable, "-I", "-m", "ksmpolicy", "--policy", self.policy_path]
        argv += ["proxmox", "persist", self.vmid, "--root", self.root, "--qm", self.qm]
        spawn_persist(argv)


def verdict(vmid: str, facts: PveFacts, decision: Decision) -> tuple[str, str] | None:
    """None when the config complies with the decision, else (how it drifts, one line)."""
    from ksmpolicy.policy.decide import drift  # noqa: PLC0415

    how = drift(decision, facts.vm, merging_off=facts.merging_off)
    if how is None:
        return None
    who = f"VM {vmid} ({facts.vm.name!r})"
    rule = decision.rule_text
    if how == "mergeable" and decision.merge:  # under trust domains
        return how, (
            f"ksmpolicy: {who} is in trust domain {decision.domain!r}: ksmpolicy switches its "
            "merging on, live, only while that domain merges, so its config needs allow-ksm 0."
        )
    if how == "mergeable":
        return how, f"ksmpolicy: {who} must not share memory ({rule}) but its config allows KSM."
    return how, f"ksmpolicy: {who} may share memory ({rule}) but its config turns KSM off."
