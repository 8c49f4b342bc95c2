"""Predictions from sketches (placement/plan.py), on sketches built by hand: ranking, trust
domains, exclusions, zero pages, the reserve, and the JSON a host's sketch travels as."""

from __future__ import annotations

import dataclasses
import json
import uuid as uuids

import numpy as np
import pytest

from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.placement.document import from_json, to_json
from ksmpolicy.placement.plan import place
from ksmpolicy.placement.rebalance import rebalance
from ksmpolicy.placement.sketch import FleetKey, HostSketch, SketchError, VmSketch

K = 64
MIB = 2**20
KEY = FleetKey(b"k" * 32)


def vm(
    name: str,
    values: range | list[int],
    *,
    domain: str = "default",
    merges: bool = True,
    active: bool | None = None,
    zero: int = 0,
    repeats: dict[int, int] | None = None,
    present: int = 65536,
    platform: str = "libvirt",
    vmid: str | None = None,
    exact: dict[int, int] | None = None,
) -> VmSketch:
    array = np.array(sorted(values), dtype=np.uint64)
    counts = np.ones(array.size, dtype=np.uint32)
    for index, count in {**(repeats or {}), **(exact or {})}.items():
        counts[index] = count
    return VmSketch(
        name=name,
        uuid=str(uuids.uuid5(uuids.NAMESPACE_DNS, name)),
        vmid=vmid,
        platform=platform,
        domain=domain,
        group=None,
        merges=merges,
        active=merges if active is None else active,
        ram_bytes=present * PAGE_SIZE,
        present_pages=present,
        zero_pages=zero,
        volatile_pages=0,
        values=array,
        counts=counts,
        exact=np.isin(np.arange(array.size), list(exact or {})),
    )


def host(
    name: str,
    *vms: VmSketch,
    available_mib: int = 8192,
    zero_page: bool = True,
    active_domains: tuple[str, ...] | None = None,
) -> HostSketch:
    return HostSketch(
        host=name,
        key_id=KEY.key_id,
        k=K,
        use_zero_pages=zero_page,
        max_page_sharing=256,
        mem_total_bytes=16384 * MIB,
        mem_available_bytes=available_mib * MIB,
        taken_at=0.0,
        active_domains=active_domains,
        vms=vms,
    )


WEB = range(1000, 1600)  # 600 sampled contents: 600 x 64 pages = 150 MiB
DB = range(5000, 5800)


def test_a_web_vm_is_placed_where_the_web_vms_are() -> None:
    a = host("a", vm("web-1", WEB), vm("web-2", WEB))
    b = host("b", vm("db-1", DB), vm("web-3", [*WEB[:500], *range(9000, 9100)]))
    subject, ranked = place([a, b], "web-3")
    assert subject.name == "web-3"
    assert [p.host for p in ranked] == ["a", "b"]
    assert ranked[0].shared_bytes == 500 * K * PAGE_SIZE  # what web-3 holds of web-1's
    assert ranked[1].current and ranked[1].shared_bytes == 0  # db-1 holds none of it


def test_another_domains_identical_vms_are_never_counted() -> None:
    a = host("a", vm("web-1", WEB, domain="tenant-b"), vm("web-2", WEB, domain="tenant-b"))
    b = host("b", vm("web-3", WEB, domain="tenant-a"), vm("db-1", DB, domain="tenant-a"))
    _subject, ranked = place([a, b], "web-3")
    on_a = next(p for p in ranked if p.host == "a")
    assert on_a.shared_bytes == 0 and on_a.saved_bytes == 0


def test_vms_that_may_not_merge_hold_nothing_to_share_with() -> None:
    a = host("a", vm("web-1", WEB, merges=False))
    b = host("b", vm("web-3", WEB), vm("web-4", WEB))
    _subject, ranked = place([a, b], "web-3")
    assert ranked[0].host == "b" and ranked[0].current
    assert next(p for p in ranked if p.host == "a").shared_bytes == 0
    _subject, excluded = place([a, b], "web-1")
    assert all(p.saved_bytes == 0 for p in excluded)


def test_zero_pages_and_repeats_count_as_each_host_merges_them() -> None:
    subject = vm("web-1", WEB, zero=2560, repeats={0: 3})
    with_zero_page = host("a", available_mib=8192, zero_page=True)
    without = host("b", available_mib=8192, zero_page=False)
    home = host("c", subject)
    _s, ranked = place([home, with_zero_page, without], "web-1")
    saved = {p.host: p.saved_bytes // PAGE_SIZE for p in ranked}
    assert saved["a"] == 2 * K + 2560  # its repeated content (3 copies: 2 saved) and zeros
    assert saved["b"] == 2 * K + 2560 - 10  # zero pages merged in KSM pages of 256 sharers


def test_a_content_held_k_times_or_more_counts_for_itself() -> None:
    """Kept exactly (not sampled): its copies count once each, not K times."""
    subject = vm("web-1", [7, *WEB], exact={0: 20_000})
    empty, holding = host("a"), host("b", vm("web-2", [7]))
    _s, ranked = place([host("c", subject), empty, holding], "web-1")
    saved = {p.host: p.saved_bytes // PAGE_SIZE for p in ranked}
    assert saved["a"] == 19_999  # all but one copy
    assert saved["b"] == 20_000  # every copy: web-2 holds the content


def test_a_host_without_room_is_ranked_last_and_said_so() -> None:
    a = host("a", vm("web-1", WEB), available_mib=100)
    b = host("b", vm("db-1", DB), available_mib=8192)
    c = host("c", vm("web-3", WEB))
    _s, ranked = place([a, b, c], "web-3", reserve_bytes=64 * MIB)
    assert ranked[-1].host == "a" and not ranked[-1].fits
    assert ranked[-1].headroom_bytes < 0
    current = next(p for p in ranked if p.current)
    assert current.headroom_bytes == 8192 * MIB - 64 * MIB  # what it saves there is in it


def test_only_the_domain_that_merges_on_a_host_counts_there() -> None:
    """Under trust domains one domain merges per merge scope: a VM of another domain would
    not merge there at all, and one of the active domain shares only with its merging VMs."""
    a = host(
        "a",
        vm("web-1", WEB, domain="blue"),
        vm("web-2", WEB, domain="red", active=False),
        active_domains=("blue",),
    )
    b = host("b", vm("web-3", WEB, domain="red"), vm("web-4", WEB, domain="blue"))
    _s, ranked = place([a, b], "web-3")
    on_a = next(p for p in ranked if p.host == "a")
    assert on_a.saved_bytes == 0 and on_a.why_not == "trust domain blue merges there"
    _s, ranked = place([a, b], "web-4")
    on_a = next(p for p in ranked if p.host == "a")
    assert on_a.shared_bytes == 600 * K * PAGE_SIZE and on_a.why_not is None
    _s, ranked = place([a, b], "web-2")  # red does not merge where it is: saves nothing now
    here = next(p for p in ranked if p.current)
    assert here.saved_bytes == 0 and here.why_not
    idle = host("c", active_domains=())  # no domain merges there yet: it would take the host
    _s, ranked = place([a, b, idle], "web-2")
    assert next(p for p in ranked if p.host == "c").why_not is None


def test_rebalance_moves_vms_to_their_kind_and_never_across_domains() -> None:
    a = host("a", vm("web-1", WEB), vm("db-2", DB), vm("t-web", WEB, domain="other"))
    b = host("b", vm("db-1", DB), vm("web-2", WEB))
    moves = rebalance([a, b], max_moves=5, min_gain_bytes=MIB)
    # the largest gain first: a database VM (800 samples) joins the other, then a web VM
    assert [m.gain_bytes // (K * PAGE_SIZE) for m in moves] == [800, 600], moves
    after = {"a": {"web-1", "db-2", "t-web"}, "b": {"db-1", "web-2"}}
    for m in moves:
        after[m.source].remove(m.vm.name)
        after[m.target].add(m.vm.name)
    # with room to spare, each kind ends up on one host
    for kind in ("web", "db"):
        assert len({h for h, names in after.items() for n in names if n.startswith(kind)}) == 1
    assert "t-web" in after["a"]  # nothing of its domain anywhere: no gain, not moved
    assert all(m.command().startswith("virsh migrate --live") for m in moves)


def test_rebalance_does_not_move_a_vm_where_another_domain_merges() -> None:
    a = host("a", vm("web-1", WEB, domain="blue"), active_domains=("blue",))
    b = host("b", vm("web-2", WEB, domain="red"), vm("db-1", DB, domain="red"))
    assert rebalance([a, b], min_gain_bytes=MIB) == []
    c = host("c", vm("web-3", WEB, domain="red"), active_domains=("red",))
    (move,) = rebalance([a, b, c], max_moves=1, min_gain_bytes=MIB)
    assert move.vm.name in ("web-2", "web-3") and move.target in ("b", "c")


def test_rebalance_keeps_the_reserve_and_the_minimum_gain() -> None:
    a = host("a", vm("web-1", WEB), available_mib=10)
    b = host(
        "b", vm("web-2", WEB, vmid="101", platform="proxmox"), vm("db-1", DB), available_mib=10
    )
    assert rebalance([a, b], reserve_bytes=64 * MIB, min_gain_bytes=MIB) == []
    roomy = host("a", vm("web-1", WEB), available_mib=8192)
    moves = rebalance([roomy, b], reserve_bytes=64 * MIB, min_gain_bytes=MIB)
    assert [m.command() for m in moves] == ["qm migrate 101 a --online"]
    assert rebalance([roomy, b], min_gain_bytes=4096 * MIB) == []


def test_a_sketch_travels_as_json_and_back() -> None:
    original = host(
        "a", vm("web-1", WEB, zero=7, repeats={3: 9}, exact={5: 80}), vm("db-1", DB, merges=False)
    )
    document = json.loads(json.dumps(to_json(original, KEY)))
    back = from_json(document, "a.json", KEY)
    assert back.host == "a" and back.key_id == KEY.key_id and back.k == K
    for before, after in zip(original.vms, back.vms, strict=True):
        assert np.array_equal(before.values, after.values)
        assert np.array_equal(before.counts, after.counts)
        assert np.array_equal(before.exact, after.exact)
        assert (before.name, before.domain, before.merges, before.zero_pages) == (
            after.name,
            after.domain,
            after.merges,
            after.zero_pages,
        )


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda d: d.update(format="other"), "not a ksmpolicy sketch"),
        (lambda d: d.update(k="64"), "k: expected a number"),
        (lambda d: d.update(k=2**20 + 1), "k: expected a number from 1 to 1048576"),
        (lambda d: d.update(k=10**400), "k: expected a number"),
        (lambda d: d.update(mem_available_bytes=2**40), "mem_available_bytes: expected a num"),
        (lambda d: d["vms"][0].update(values="%%%"), "vms.0.values: not base64"),
        (lambda d: d["vms"][0].update(merges="yes"), "vms.0.merges: expected true or false"),
        (lambda d: d["vms"][0].update(active=1), "vms.0.active: expected true or false"),
        (lambda d: d["vms"][0].update(repeats=[[99999, 2]]), "vms.0.repeats.0"),
        (lambda d: d["vms"][0].update(name=["web"]), "vms.0.name: expected text of 1 to 1024"),
        (lambda d: d["vms"][0].update(name="w" * 1025), "vms.0.name: expected text of 1 to"),
        (lambda d: d["vms"][0].update(present_pages=10), "more than its present_pages"),
        (lambda d: d["vms"][0].update(zero_pages=2**41), "vms.0.zero_pages: expected a number"),
        (lambda d: d["vms"][0].update(domain="a\n"), "vms.0.domain: expected a domain or group"),
        (lambda d: d.update(active_domains=["(x)"]), "active_domains.0: expected a domain"),
        # every field that reaches a printed command is what it claims, whatever the seal
        (lambda d: d.update(host="x/system?command=/tmp/pwn#"), "host: 'x/system"),
        (lambda d: d.update(host="-oProxyCommand=sh"), "is no host name"),
        (lambda d: d.update(host="fe80::1%eth0"), "is no host name"),
        (lambda d: d["vms"][0].update(uuid="--domain=victim"), "vms.0.uuid: expected a UUID"),
        (lambda d: d["vms"][0].update(vmid="--force"), "vms.0.vmid: expected a VMID"),
        (lambda d: d["vms"][0].update(vmid="0101"), "vms.0.vmid: expected a VMID"),
        (lambda d: d["vms"][0].update(platform="xen"), "vms.0.platform: expected one of"),
    ],
)
def test_a_bad_sketch_is_refused_naming_the_file_and_the_key(change, said) -> None:  # type: ignore[no-untyped-def]
    """Each field checked, on documents sealed after the change (as a host of the fleet with
    a bug, or an attacker with the key, would write them)."""
    document = to_json(host("a", vm("web-1", WEB)), KEY)
    change(document)
    document["seal"] = KEY.seal(document)
    with pytest.raises(SketchError, match=said) as caught:
        from_json(document, "a.json", KEY)
    assert str(caught.value).startswith("a.json: ")


def test_a_sketch_not_sealed_under_the_fleet_key_is_refused() -> None:
    document = to_json(host("a", vm("web-1", WEB)), KEY)
    from_json(json.loads(json.dumps(document)), "a.json", KEY)  # as written: accepted
    changed = json.loads(json.dumps(document))
    changed["vms"][0]["domain"] = "other"
    with pytest.raises(SketchError, match=r"a\.json: its seal does not match"):
        from_json(changed, "a.json", KEY)
    forged = to_json(host("a", vm("web-1", WEB)), FleetKey(b"j" * 32))
    forged["key_id"] = KEY.key_id  # the key's name is public: copying it proves nothing
    with pytest.raises(SketchError, match="its seal does not match"):
        from_json(forged, "a.json", KEY)
    del document["seal"]
    with pytest.raises(SketchError, match="its seal does not match"):
        from_json(document, "a.json", KEY)


def test_a_vm_in_two_sketches_is_refused() -> None:
    """A VM sketched on both hosts (it moved between the two sketches) would be placed beside
    its own copy."""
    twin = vm("web-1", WEB)
    a = host("a", twin)
    b = host("b", dataclasses.replace(twin, name="renamed"), vm("web-2", WEB))
    with pytest.raises(SketchError, match=f"VM {twin.uuid} is in the sketches of both a and b"):
        rebalance([a, b], min_gain_bytes=MIB)
    pa = host("a", vm("x", WEB, platform="proxmox", vmid="101"))
    pb = host("b", vm("y", WEB, platform="proxmox", vmid="101"))
    with pytest.raises(SketchError, match="Proxmox VM 101 is in the sketches of both"):
        place([pa, pb], "x")


def test_sketches_under_different_keys_or_rates_are_not_compared() -> None:
    a = host("a", vm("web-1", WEB))
    other_key = HostSketch(**{**a.__dict__, "host": "b", "key_id": "0123456789abcdef"})
    with pytest.raises(SketchError, match="another fleet key"):
        place([a, other_key], "web-1")
    other_k = HostSketch(**{**a.__dict__, "host": "b", "k": 128})
    with pytest.raises(SketchError, match="1 page in 128"):
        place([a, other_k], "web-1")


def test_the_keyed_values_depend_on_the_key_and_the_domain() -> None:
    """The same contents in two domains give unrelated values: a reader of sketches cannot
    tell that two tenants hold the same pages."""
    digests = np.arange(20, dtype=np.uint64).reshape(10, 2)
    values = KEY.values(digests, "default")
    assert np.array_equal(values, KEY.values(digests, "default"))
    assert not np.any(np.isin(values, FleetKey(b"j" * 32).values(digests, "default")))
    assert not np.any(np.isin(values, KEY.values(digests, "tenant-a")))
    assert KEY.key_id != FleetKey(b"j" * 32).key_id


def test_a_move_names_the_vm_by_what_its_operator_controls() -> None:
    """libvirt: the UUID, as --domain; never the name (a tenant may choose it: as a word it
    could be an option of virsh's)."""
    hostile = "--domain=victim; rm -rf / #$(id)"
    a = host("a", vm("web-1", WEB))
    b = host("b", vm(hostile, WEB), vm("db-1", DB), available_mib=10)
    (move,) = rebalance([a, b], max_moves=1, min_gain_bytes=MIB)
    assert move.vm.name == hostile
    assert move.command() == (
        f"virsh migrate --live --persistent --domain {move.vm.uuid} --desturi qemu+ssh://a/system"
    )
    ipv6 = host("fd00::2", vm("web-1", WEB))
    (move,) = rebalance([ipv6, b], max_moves=1, min_gain_bytes=MIB)
    assert move.command().endswith("--desturi 'qemu+ssh://[fd00::2]/system'")
    nameless = dataclasses.replace(move.vm, uuid=None)
    assert dataclasses.replace(move, vm=nameless).command().startswith("# ")


def test_a_vm_is_found_by_the_kind_of_identity_given() -> None:
    """A tenant names its VM: a name that is another VM's UUID or VMID never stands for it."""
    victim = vm("web-1", WEB, platform="proxmox", vmid="101")
    assert victim.uuid is not None
    impostors = (vm(victim.uuid, DB), vm("101", DB))
    hosts = [host("a", victim), host("b", *impostors)]
    for ref in (victim.uuid, victim.uuid.upper(), "101", "web-1"):
        subject, _ranked = place(hosts, ref)
        assert subject is victim, ref
    subject, _ranked = place(hosts, str(impostors[1].uuid))
    assert subject.name == "101"
    with pytest.raises(SketchError, match=r"no VM with the VMID '102'.*give its UUID"):
        place(hosts, "102")
