"""decide(): table-driven cases and properties that hold for every VM and policy."""

from __future__ import annotations

import fnmatch
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmpolicy.policy.decide import Decider, MemoryRegion, VmFacts, decide
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.policy.model import Action, Group, Match, Policy, Rule

POLICY = parse_policy(
    textwrap.dedent(
        """\
        version: 1
        default: merge
        groups:
          ubuntu: {images: ["/images/ubuntu-24.04*.qcow2"]}
          win: {tags: [windows]}
          pve-debian: {images: ["*:base-9000-disk-*"]}
          named: {names: ["ci-*"]}
        rules:
          - name: databases
            match: {tags: [database, latency-sensitive]}
            action: exclude
          - name: db names
            match: {names: ["db-*", "pg-?"]}
            action: exclude
          - name: untrusted windows
            match: {groups: [win], tags: [untrusted]}
            action: exclude
          - name: ubuntu web
            match: {groups: [ubuntu], names: ["web-*"]}
            action: merge
          - name: all ubuntu otherwise
            match: {groups: [ubuntu]}
            action: exclude
          - name: old images
            match: {images: ["/images/old/*"]}
            action: exclude
        vms:
          pg-primary: {tags: [database]}
          "vmid:101": {tags: [latency-sensitive]}
          uuid:0a0a0a0a-0000-4000-8000-000000000001: {tags: [database]}
        """
    ),
    "t.yaml",
)

UBUNTU = ("/images/ubuntu-24.04-base.qcow2",)
HUGE = (MemoryRegion("ram", hugepages=True),)
SHARED = (MemoryRegion("ram", shared=True),)

# (facts, merge, group, rule)
CASES = [
    (VmFacts("plain"), True, None, None),
    (VmFacts("x", tags=frozenset({"database"})), False, None, "databases"),
    (VmFacts("x", tags=frozenset({"Latency-Sensitive"})), False, None, "databases"),
    (VmFacts("pg-primary"), False, None, "databases"),
    (VmFacts("vm", vmid="101"), False, None, "databases"),
    (VmFacts("vm", uuid="0A0A0A0A-0000-4000-8000-000000000001"), False, None, "databases"),
    (VmFacts("db-orders"), False, None, "db names"),
    (VmFacts("pg-1"), False, None, "db names"),
    (VmFacts("pg-12"), True, None, None),
    (VmFacts("DB-upper"), True, None, None),  # names are case-sensitive, like libvirt's
    (VmFacts("w", tags=frozenset({"windows", "untrusted"})), False, "win", "untrusted windows"),
    (VmFacts("w", tags=frozenset({"windows"})), True, "win", None),
    (VmFacts("x", tags=frozenset({"untrusted"})), True, None, None),
    (VmFacts("web-1", images=UBUNTU), True, "ubuntu", "ubuntu web"),
    (VmFacts("mail", images=UBUNTU), False, "ubuntu", "all ubuntu otherwise"),
    (VmFacts("db-1", images=UBUNTU), False, "ubuntu", "db names"),
    (VmFacts("a", images=("/images/x.qcow2", "/images/old/y.img")), False, None, "old images"),
    (VmFacts("c", images=("local-lvm:base-9000-disk-0/vm-101-disk-0",)), True, "pve-debian", None),
    (VmFacts("ci-7"), True, "named", None),
    (VmFacts("huge", regions=HUGE), False, None, None),
    (VmFacts("shm", regions=SHARED), False, None, None),
]


@pytest.mark.parametrize(("facts", "merge", "group", "rule"), CASES)
def test_decide_table(facts: VmFacts, merge: bool, group: str | None, rule: str | None) -> None:
    decision = decide(facts, POLICY)
    assert (decision.merge, decision.group, decision.rule) == (merge, group, rule)


def test_reasons_say_why() -> None:
    assert decide(VmFacts("plain"), POLICY).reason == "no rule matched; default is merge"
    assert decide(VmFacts("pg-primary"), POLICY).reason == (
        "rule 'databases' (line 9): tag database -> exclude"
    )
    assert decide(VmFacts("web-1", images=UBUNTU), POLICY).reason == (
        "rule 'ubuntu web' (line 18): group ubuntu; name web-1 ~ web-* -> merge"
    )
    huge = decide(VmFacts("h", regions=HUGE), POLICY)
    assert huge.action is Action.MERGE
    assert huge.reason == (
        "hugepage-backed memory is never merged by KSM (policy: no rule matched; default is merge)"
    )


def test_tags_merge_policy_and_vm_tags() -> None:
    decision = decide(VmFacts("pg-primary", tags=frozenset({"Prod"})), POLICY)
    assert decision.tags == ("database", "prod")


def test_default_exclude() -> None:
    policy = parse_policy("version: 1\ndefault: exclude\n")
    decision = decide(VmFacts("anything"), policy)
    assert (decision.merge, decision.action, decision.rule) == (False, Action.EXCLUDE, None)


# --- properties: the indexed Decider agrees with the obvious first-match loop ----------------

NAMES = ["web-1", "web-2", "db-1", "pg-a", "ci-9", "mail", "x"]
TAGS = ["database", "web", "windows", "untrusted", "prod"]
IMAGES = ["/img/ubuntu-1.qcow2", "/img/debian.qcow2", "local:base-9000-disk-0/vm-1-disk-0"]
NAME_GLOBS = ["web-*", "db-?", "pg-[a-c]", "*", "mail", "x*", "ci-*"]
IMAGE_GLOBS = ["/img/ubuntu-*", "/img/*", "*:base-9000-*", "/img/debian.qcow2"]


def pick(options: list[str]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(options), max_size=2, unique=True).map(tuple)


groups_st = st.lists(st.tuples(pick(IMAGE_GLOBS), pick(TAGS), pick(NAME_GLOBS)), max_size=3).map(
    lambda specs: tuple(Group(f"g{i}", *spec) for i, spec in enumerate(specs))
)
rule_st = st.builds(
    Rule,
    name=st.text("abc", min_size=1, max_size=4),
    match=st.builds(
        Match,
        names=pick(NAME_GLOBS),
        tags=pick(TAGS),
        groups=pick(["g0", "g1", "g2"]),
        images=pick(IMAGE_GLOBS),
    ),
    action=st.sampled_from(list(Action)),
)
policy_st = st.builds(
    Policy,
    default=st.sampled_from(list(Action)),
    groups=groups_st,
    rules=st.lists(rule_st, max_size=12).map(tuple),
    vms=st.dictionaries(
        st.sampled_from(NAMES).map(lambda n: f"name:{n}"),
        st.lists(st.sampled_from(TAGS), min_size=1, max_size=2, unique=True).map(tuple),
        max_size=3,
    ),
)
facts_st = st.builds(
    VmFacts,
    name=st.sampled_from(NAMES),
    tags=pick(TAGS).map(frozenset),
    images=pick(IMAGES),
    regions=st.lists(
        st.builds(
            MemoryRegion,
            st.sampled_from(["ram", "node0", "node1"]),
            st.none(),
            st.booleans(),
            st.booleans(),
        ),
        max_size=3,
    ).map(tuple),
)


def reference_rule(facts: VmFacts, policy: Policy) -> tuple[str | None, Rule | None]:
    """The policy semantics written as plainly as possible."""
    tags = set(facts.tags) | set(policy.vms.get(f"name:{facts.name}", ()))
    group = None
    for g in policy.groups:
        if (
            set(g.tags) & tags
            or any(fnmatch.fnmatchcase(facts.name, p) for p in g.names)
            or any(fnmatch.fnmatchcase(i, p) for i in facts.images for p in g.images)
        ):
            group = g.name
            break
    for rule in policy.rules:
        m = rule.match
        if (
            (not m.names or any(fnmatch.fnmatchcase(facts.name, p) for p in m.names))
            and (not m.tags or set(m.tags) & tags)
            and (not m.groups or group in m.groups)
            and (
                not m.images
                or any(fnmatch.fnmatchcase(i, p) for i in facts.images for p in m.images)
            )
        ):
            return group, rule
    return group, None


@settings(max_examples=400, deadline=None)
@given(policy_st, facts_st)
def test_first_match_wins_like_the_plain_loop(policy: Policy, facts: VmFacts) -> None:
    group, rule = reference_rule(facts, policy)
    decision = Decider(policy).decide(facts)
    assert decision.group == group
    assert decision.rule == (rule.name if rule else None)
    assert decision.action == (rule.action if rule else policy.default)


@settings(max_examples=200, deadline=None)
@given(policy_st, facts_st)
def test_unmergeable_memory_is_never_reported_mergeable(policy: Policy, facts: VmFacts) -> None:
    decision = decide(facts, policy)
    if facts.regions and not any(r.can_merge for r in facts.regions):
        assert decision.merge is False
    else:
        assert decision.merge == (decision.action is Action.MERGE)


@settings(max_examples=100, deadline=None)
@given(policy_st, st.lists(facts_st, min_size=1, max_size=5))
def test_deterministic_and_order_independent(policy: Policy, vms: list[VmFacts]) -> None:
    decider = Decider(policy)
    forward = [decider.decide(vm) for vm in vms]
    backward = [Decider(policy).decide(vm) for vm in reversed(vms)]
    assert forward == list(reversed(backward))


# --- trust domains ------------------------------------------------------------------------------

DOMAINS = """version: 1
default: exclude
domains:
  provider: {priority: 10, nodes: [0]}
  tenant-b: {}
groups:
  web: {names: ["web-*"], tags: [web], domain: provider}
  plain: {tags: [plain]}
rules:
  - name: tenants merge among themselves
    match: {domains: [tenant-b]}
    action: merge
  - name: provider web
    match: {domains: [provider], groups: [web]}
    action: merge
vms:
  cust-7: {domain: tenant-b}
  vmid:4107: {domain: tenant-b}
  ops-1: {tags: [web]}
isolation: {merge_across_nodes: false}
"""


def test_a_vms_domain_comes_from_vms_then_its_group_then_default() -> None:
    from ksmpolicy.policy.load import parse_policy

    decider = Decider(parse_policy(DOMAINS))
    web = decider.decide(VmFacts("web-1"))
    assert (web.domain, web.domain_reason, web.bind_nodes, web.merge) == (
        "provider",
        "group web",
        (0,),
        True,
    )
    assert "domain provider" in web.reason
    cust = decider.decide(VmFacts("cust-7"))
    assert (cust.domain, cust.domain_reason, cust.merge) == ("tenant-b", "vms: name:cust-7", True)
    assert decider.decide(VmFacts("x", vmid="4107")).domain == "tenant-b"
    other = decider.decide(VmFacts("db-1"))
    assert (other.domain, other.merge) == ("default", False)
    # under domains no definition merges from its start: the daemon switches RAM on live
    assert not web.definition_merges and not cust.definition_merges


def test_tags_a_vm_carries_itself_never_put_it_into_a_domain() -> None:
    """Whoever may edit a VM (Proxmox tags, libvirt metadata) sets its own tags; a group with
    a domain is joined only through the name, images and the tags the policy gives."""
    from ksmpolicy.policy.load import parse_policy

    decider = Decider(parse_policy(DOMAINS))
    forged = decider.decide(VmFacts("shop", tags=frozenset({"web"})))
    assert (forged.group, forged.domain, forged.merge) == (None, "default", False)
    given = decider.decide(VmFacts("ops-1"))  # the policy's own tag: believed
    assert (given.group, given.domain) == ("web", "provider")
    plain = decider.decide(VmFacts("p", tags=frozenset({"plain"})))  # no domain: as before
    assert (plain.group, plain.domain) == ("plain", "default")
