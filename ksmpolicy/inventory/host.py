"""The host in the inventory: KSM's state, its knobs, and who controls them (this daemon,
ksmtuned, the kernel advisor, nobody)."""

from __future__ import annotations

from collections.abc import Sequence

from ksmpolicy.inventory.model import HostStatus
from ksmpolicy.kernel.controllers import Controller, daemon_pids, other_controllers
from ksmpolicy.kernel.ksm import KsmState
from ksmpolicy.paths import HostPaths
from ksmpolicy.runtime.alive import read_alive


def host_status(
    paths: HostPaths, state: KsmState | None, share: float | None, cpu: float | None
) -> HostStatus:
    if state is None:
        return HostStatus(
            False,
            False,
            "none (no KSM in this kernel)",
            {},
            0,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
    values = state.values
    running = state.get("run") == 1
    daemons = daemon_pids(paths)  # one walk of /proc for the daemons, one for the others
    others = other_controllers(
        paths, own_pids=tuple(daemons[:1]), advisor_wanted=bool(daemons), daemons=daemons
    )
    alive = read_alive(paths) if daemons else None
    return HostStatus(
        available=True,
        running=running,
        controller=controller(state, daemons, others),
        knobs={k: v for k, v in values.items() if k in _SHOWN_KNOBS},
        saved_bytes=state.saved_bytes,
        general_profit_bytes=state.get("general_profit"),
        full_scans=state.get("full_scans"),
        ksmd_cpu_percent=share,
        ksmd_cpu_seconds=cpu,
        pages_sharing=state.get("pages_sharing"),
        pages_shared=state.get("pages_shared"),
        zero_pages=state.get("ksm_zero_pages"),
        pages_scanned=state.get("pages_scanned"),
        others=tuple((f"{c.name} ({c.detail})", c.running) for c in others),
        passive=alive.passive if alive is not None and alive.fresh() else None,
        discovery=alive.discovery if alive is not None and alive.fresh() else None,
        pace=alive.pace if alive is not None and alive.fresh() else None,
    )


_SHOWN_KNOBS = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "advisor_mode",
    "max_page_sharing",
    "merge_across_nodes",
    "use_zero_pages",
    "smart_scan",
)


DAEMON_CONTROLLER = "ksmpolicy daemon"


def controller(state: KsmState, daemons: Sequence[int], others: Sequence[Controller]) -> str:
    if daemons:
        return DAEMON_CONTROLLER
    if any(c.name == "ksmtuned" and c.running for c in others):
        return "ksmtuned"
    if state.values.get("advisor_mode") == "scan-time":
        return "kernel scan-time advisor"
    if state.get("run") == 1:
        return "unknown (KSM runs with fixed knobs)"
    return "nobody (KSM is stopped)"
