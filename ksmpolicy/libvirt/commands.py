"""The commands an operator runs on a libvirt host, as ksmpolicy prints them in its fixes:
names quoted for a POSIX shell, or the UUID where a name cannot be pasted."""

from __future__ import annotations

from ksmpolicy.quoting import fix_command, shell_word


def redefine(name: str, uuid: str | None) -> str:
    """Rewrite the persistent definition for the policy."""
    return fix_command("ksmpolicy apply", name, uuid)


def switch_live(name: str, uuid: str | None) -> str:
    """Switch the running guest RAM's merging to the policy now (QMP)."""
    return fix_command("ksmpolicy enforce --live", name, uuid)


def restart(name: str, uuid: str | None) -> tuple[str, tuple[str, ...]]:
    """(text, steps) that restart a domain so that QEMU starts again from its definition: a
    reboot inside the guest keeps the QEMU process, and with it its start-time setting."""
    word = shell_word(name) or shell_word(uuid or "") or "NAME"
    steps = (f"virsh shutdown {word}", f"virsh start {word}")
    return f"{steps[0]}, then {steps[1]} once it is off", steps
