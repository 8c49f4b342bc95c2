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

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.hook import _report, _says_block
from ksmpolicy.host import HostPaths, default_policy
from ksmpolicy.policy import Action, Enforcement, Policy, load_policy

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from typing import IO

    from ksmpolicy.decide import Decision
    from ksmpolicy.proxmox_conf import PveFacts

PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")


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
        self.run_dir = run_dir
        self.qm = qm

    def run(self, phase: str, out: IO[str], err: IO[str]) -> int:
        from ksmpolicy.proxmox import valid_vmid  # noqa: PLC0415

        try:
            valid_vmid(self.vmid)
        except KsmPolicyError as exc:
            _report(err, f"ksmpolicy: hookscript called for {exc}", "err")
            return 1 if phase == "pre-start" and _says_block(self.policy_path) else 0
        chained = self.chained(phase, out, err)
        if chained != 0 and phase == "pre-start":
            return chained  # the other hookscript refused the start: so do we
        if phase == "pre-start":
            status = self.pre_start(err)
        elif phase == "post-start":
            status = self.post_start(err)
        elif phase == "post-stop":
            self.notify("stopped")
            status = 0
        else:
            status = 0
        return chained or status

    # --- phases

    def pre_start(self, err: IO[str]) -> int:
        policy = self.load_policy(err)
        if policy is None:
            return 1 if _says_block(self.policy_path) else 0
        if policy.enforcement is Enforcement.OFF:
            return 0
        try:
            facts, decision, note = self.evaluate(policy)
        except KsmPolicyError as exc:
            return self.own_failure(f"cannot check VM {self.vmid}: {exc}", policy, err)
        except Exception as exc:  # a bug must not stop VMs unless the policy says so
            what = f"{type(exc).__name__}: {exc}"
            failure = f"internal error checking VM {self.vmid}: {what}"
            return self.own_failure(failure, policy, err)
        if note:
            _report(err, f"ksmpolicy: VM {self.vmid}: {note}", "warning")
        message = verdict(self.vmid, facts, decision)
        if message is None:
            return 0
        fix = f"ksmpolicy apply --proxmox --vmid {self.vmid}"
        if policy.enforcement is Enforcement.BLOCK and decision.action is Action.EXCLUDE:
            _report(err, f"{message} Fix: {fix}", "err")
            return 1
        _report(err, f"{message} It is switched at post-start; to persist now: {fix}", "warning")
        return 0

    def post_start(self, err: IO[str]) -> int:
        """Switch the running VM to its decision; persist it later; tell the daemon."""
        from ksmpolicy.proxmox import set_live_merge  # noqa: PLC0415

        self.notify("started")
        policy = self.load_policy(err)
        if policy is None:
            return 0
        try:
            facts, decision, _note = self.evaluate(policy)
            if policy.live and not (facts.vm.hugepages or facts.vm.shared_memory):
                merge = decision.action is Action.MERGE
                socket = str(self.paths.qmp_socket(self.vmid))
                changed = set_live_merge(socket, merge)
                if changed:
                    state = "on" if merge else "off"
                    print(f"ksmpolicy: VM {self.vmid}: merging switched {state} live", file=err)
            if verdict(self.vmid, facts, decision) is not None:
                self.spawn_persist()
        except KsmPolicyError as exc:
            _report(err, f"ksmpolicy: VM {self.vmid}: post-start: {exc}", "warning")
        except Exception as exc:  # post-start failures only warn in Proxmox: say so and go on
            message = f"ksmpolicy: VM {self.vmid}: internal error at post-start: {exc}"
            _report(err, message, "warning")
        return 0

    # --- shared

    def load_policy(self, err: IO[str]) -> Policy | None:
        try:
            return load_policy(self.policy_path, cache_dir=str(self.paths.run_dir))
        except KsmPolicyError as exc:
            first = str(exc).splitlines()[0]
            message = f"ksmpolicy: policy not usable, VM {self.vmid} not checked: {first}"
            _report(err, message, "err")
            return None

    def evaluate(self, policy: Policy) -> tuple[PveFacts, Decision, str | None]:
        from ksmpolicy.decide import Decider  # noqa: PLC0415
        from ksmpolicy.proxmox import read_config, uses_allow_ksm  # noqa: PLC0415
        from ksmpolicy.proxmox_conf import apply_policy  # noqa: PLC0415

        text = read_config(self.paths, self.vmid)
        _new, facts, decision, note = apply_policy(
            text, self.vmid, Decider(policy), use_allow_ksm=uses_allow_ksm(policy)
        )
        return facts, decision, note

    def own_failure(self, message: str, policy: Policy, err: IO[str]) -> int:
        block = policy.enforcement is Enforcement.BLOCK
        _report(err, f"ksmpolicy: {message}", "err" if block else "warning")
        return 1 if block else 0

    def chained(self, phase: str, out: IO[str], err: IO[str]) -> int:
        """Run the hookscript that was attached before ours, with the same arguments."""
        from ksmpolicy.proxmox import previous_hookscript, volume_path  # noqa: PLC0415

        previous = previous_hookscript(self.paths, self.vmid)
        if previous is None:
            return 0
        try:
            script = volume_path(self.paths, previous)
            result = subprocess.run([str(script), self.vmid, phase], check=False, timeout=600)
        except (KsmPolicyError, OSError, subprocess.TimeoutExpired) as exc:
            _report(err, f"ksmpolicy: VM {self.vmid}: chained hookscript {previous}: {exc}", "err")
            return 1
        return result.returncode

    def notify(self, event: str) -> None:
        from ksmpolicy import notify  # noqa: PLC0415

        notify.send(self.paths, event, self.vmid)

    def spawn_persist(self) -> None:
        from ksmpolicy.proxmox import spawn_persist  # noqa: PLC0415

        argv = [sys.executable, "-m", "ksmpolicy.cli", "--policy", self.policy_path]
        argv += ["proxmox", "persist", self.vmid, "--root", self.root, "--qm", self.qm]
        spawn_persist(argv)


def verdict(vmid: str, facts: PveFacts, decision: Decision) -> str | None:
    """None when the config complies with the decision, else one line saying why not."""
    vm = facts.vm
    who = f"VM {vmid} ({vm.name!r})"
    rule = f"rule {decision.rule!r}" if decision.rule else "the policy default"
    can_merge = not (facts.merging_off or vm.hugepages or vm.shared_memory)
    if decision.action is Action.EXCLUDE and can_merge:
        return f"ksmpolicy: {who} must not share memory ({rule}) but its config allows KSM."
    if decision.action is Action.MERGE and facts.merging_off:
        return f"ksmpolicy: {who} may share memory ({rule}) but its config turns KSM off."
    return None
