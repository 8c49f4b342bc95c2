"""Identity a tenant cannot forge: typed `vms:` keys, exact names, trust-ranked domain bindings,
tenant-controlled fields, and the policy cache by field name."""

from __future__ import annotations

import fnmatch
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmpolicy.errors import PolicyError
from ksmpolicy.libvirt.domain import domain_facts
from ksmpolicy.policy import load as policy_load
from ksmpolicy.policy.decide import Decider, VmFacts
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.policy.model import CONFLICT_DOMAIN, DEFAULT_DOMAIN, Group, Policy
from ksmpolicy.proxmox import conf

UUID_A = "3f1c2a9e-5b7d-4e1a-9c3b-2d4f6a8b0c11"
UUID_B = "3f1c2a9e-5b7d-4e1a-9c3b-2d4f6a8b0c12"


def problems(text: str) -> list[str]:
    try:
        parse_policy(textwrap.dedent(text), "p.yaml")
    except PolicyError as exc:
        return [str(p) for p in exc.problems]
    return []


def policy(text: str) -> Policy:
    return parse_policy(textwrap.dedent(text), "p.yaml")


DOMAINS = """\
version: 1
domains: {acme: {}, globex: {}, provider: {priority: 10}}
"""


# --- a key names one kind of identity --------------------------------------------------------


def test_a_vm_named_like_a_uuid_key_does_not_take_its_entry() -> None:
    decider = Decider(policy(DOMAINS + f"vms:\n  uuid:{UUID_A}: {{domain: acme}}\n"))
    assert decider.decide(VmFacts("x", uuid=UUID_A)).domain == "acme"
    assert decider.decide(VmFacts("x", uuid=UUID_A.upper())).domain == "acme"  # libvirt folds
    # a tenant names its VM after the acme VM's UUID: it stays where its own identity puts it
    assert decider.decide(VmFacts(UUID_A, uuid=UUID_B)).domain == DEFAULT_DOMAIN


def test_a_proxmox_vm_named_like_a_vmid_does_not_take_its_entry() -> None:
    """With the shipped vps-domains.yaml, VM 999 renamed to 4107 lands in globex today."""
    decider = Decider(policy(DOMAINS + "vms:\n  vmid:4107: {domain: globex}\n"))
    renamed = conf.facts(conf.parse("name: 4107\nmemory: 512\n"), "999").vm
    assert (renamed.name, renamed.vmid) == ("4107", "999")
    assert decider.decide(renamed).domain == DEFAULT_DOMAIN
    real = conf.facts(conf.parse("name: shop\nmemory: 512\n"), "4107").vm
    assert decider.decide(real).domain == "globex"


def test_names_compare_exactly_as_libvirt_stores_them() -> None:
    decider = Decider(policy(DOMAINS + "vms:\n  name:web-1: {domain: acme}\n"))
    xml = "<domain type='qemu'><name> web-1\t</name><memory>1024</memory></domain>"
    facts = domain_facts(xml).vm
    assert facts.name == " web-1\t"
    assert decider.decide(facts).domain == DEFAULT_DOMAIN
    assert decider.decide(VmFacts("web-1")).domain == "acme"
    assert decider.decide(VmFacts("WEB-1")).domain == DEFAULT_DOMAIN


def test_a_long_name_with_four_dashes_is_a_name_and_keeps_its_case() -> None:
    """36 characters and four dashes but no UUID: a name key, never lower-cased."""
    name = "Web-FrontendForCustomer-Acme-Prod-12"
    assert len(name) == 36 and name.count("-") == 4
    decider = Decider(policy(DOMAINS + f"vms:\n  {name}: {{domain: acme}}\n"))
    assert decider.decide(VmFacts(name)).domain == "acme"
    assert decider.decide(VmFacts(name.lower())).domain == DEFAULT_DOMAIN


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (UUID_A, f"could be a VM's UUID or its name: write 'uuid:{UUID_A}'"),
        ('"101"', "could be a Proxmox VMID or a VM's name: write 'vmid:101'"),
        ("0101", "could be a VM's name, but looks like a number: write 'name:0101'"),
        ("uuid:not-a-uuid", "'not-a-uuid' is not a UUID"),
        ("vmid:0101", "'0101' is not a Proxmox VMID"),
        ("vmid:99", "'99' is not a Proxmox VMID"),
        ("UUID:x", "unknown kind of identity 'UUID' (did you mean 'uuid:'?)"),
        ("web:1", "unknown kind of identity 'web'"),
        ("'name:'", "an empty name"),
    ],
)
def test_check_refuses_keys_that_could_mean_two_things(key: str, message: str) -> None:
    found = problems(f"version: 1\nvms:\n  {key}: {{tags: [x]}}\n")
    assert len(found) == 1 and message in found[0], found


def test_two_keys_for_one_identity_are_refused() -> None:
    found = problems(
        f"version: 1\nvms:\n  uuid:{UUID_A}: {{tags: [x]}}\n"
        f"  uuid:{UUID_A.upper()}: {{tags: [y]}}\n"
    )
    assert found == [
        f"p.yaml:4: vms.uuid:{UUID_A.upper()}: names the same VM as the entry at "
        f"line 3 (uuid:{UUID_A}): merge the two"
    ]


def test_explicit_names_reach_names_that_look_like_other_kinds() -> None:
    decider = Decider(
        policy(f"version: 1\nvms:\n  name:101: {{tags: [db]}}\n  name:{UUID_A}: {{tags: [db]}}\n")
    )
    assert decider.decide(VmFacts("101")).tags == ("db",)
    assert decider.decide(VmFacts("x", vmid="101")).tags == ()
    assert decider.decide(VmFacts(UUID_A)).tags == ("db",)
    assert decider.decide(VmFacts("x", uuid=UUID_A)).tags == ()


# --- labels never lift a VM out of its domain -----------------------------------------------


def test_a_tag_group_listed_first_does_not_move_a_vm_out_of_its_domain() -> None:
    decider = Decider(
        policy(
            DOMAINS
            + """\
groups:
  web: {tags: [web]}
  customers: {names: ["cust-*"], domain: acme}
"""
        )
    )
    decision = decider.decide(VmFacts("cust-1", tags=frozenset({"web"})))
    assert decision.group == "web"  # the label
    assert (decision.domain, decision.domain_reason) == ("acme", "group customers")


def test_own_tags_never_bind_even_when_they_name_a_domain_group() -> None:
    decider = Decider(policy(DOMAINS + "groups:\n  prov: {tags: [provider], domain: provider}\n"))
    assert decider.decide(VmFacts("t", tags=frozenset({"provider"}))).domain == DEFAULT_DOMAIN


def test_a_fixed_identity_outranks_a_name_and_a_group() -> None:
    decider = Decider(
        policy(
            DOMAINS
            + f"""\
groups:
  prov: {{images: ["/img/provider-*"], domain: provider}}
vms:
  uuid:{UUID_A}: {{domain: acme}}
  name:shop: {{domain: globex}}
"""
        )
    )
    vm = VmFacts("shop", uuid=UUID_A, images=("/img/provider-debian.qcow2",))
    decision = decider.decide(vm)
    assert decision.domain == "acme"
    assert "over group prov -> provider; vms: name:shop -> globex" in decision.domain_reason
    named = decider.decide(VmFacts("shop", images=("/img/provider-debian.qcow2",)))
    assert named.domain == "globex"  # the operator's name entry over the image group


@pytest.mark.parametrize(
    "bindings",
    [
        f"vms:\n  uuid:{UUID_A}: {{domain: acme}}\n  vmid:4107: {{domain: globex}}\n",
        "groups:\n  a: {names: [shop], domain: acme}\n  b: {images: ['/i/*'], domain: globex}\n",
    ],
)
def test_two_bindings_of_one_rank_that_disagree_make_a_conflict(bindings: str) -> None:
    decider = Decider(policy(DOMAINS + "default: merge\n" + bindings))
    decision = decider.decide(VmFacts("shop", uuid=UUID_A, vmid="4107", images=("/i/x",)))
    assert decision.domain == CONFLICT_DOMAIN
    assert (decision.merge, decision.definition_merges) == (False, False)
    assert "bound to 2 trust domains" in decision.reason and "acme" in decision.reason


def test_domain_precedence_does_not_depend_on_listing_order() -> None:
    one = """\
groups:
  a: {names: ["shop*"], domain: acme}
  b: {names: ["shop"], domain: globex}
"""
    two = """\
groups:
  b: {names: ["shop"], domain: globex}
  a: {names: ["shop*"], domain: acme}
"""
    for text in (one, two):
        assert Decider(policy(DOMAINS + text)).decide(VmFacts("shop")).domain == CONFLICT_DOMAIN


# --- tenant-controlled fields ----------------------------------------------------------------


def test_check_refuses_bindings_on_tenant_controlled_fields() -> None:
    found = problems(
        DOMAINS
        + f"""\
identity: {{tenant_controlled: [name, uuid, images]}}
groups:
  g1: {{names: ["cust-*"], domain: acme}}
  g2: {{images: ["/img/*"], domain: provider}}
  g3: {{tags: [gold], domain: globex}}
vms:
  name:shop: {{domain: acme}}
  uuid:{UUID_A}: {{domain: globex}}
  name:ops-1: {{tags: [gold]}}
  vmid:4107: {{domain: globex, tags: [gold]}}
"""
    )
    assert found == [
        "p.yaml:5: groups.g1.names: joins VMs to domain 'acme' by their names, which tenants "
        "control on this host (identity.tenant_controlled)",
        "p.yaml:6: groups.g2.images: joins VMs to domain 'provider' by their images, which "
        "tenants control on this host (identity.tenant_controlled)",
        "p.yaml:9: vms.name:shop.domain: binds a VM to domain 'acme' by its name, which tenants "
        "control on this host (identity.tenant_controlled): key it by a field they cannot "
        "change (vmid:…, or uuid:… where they cannot set it)",
        f"p.yaml:10: vms.uuid:{UUID_A}.domain: binds a VM to domain 'globex' by its uuid, "
        "which tenants control on this host (identity.tenant_controlled): key it by a field "
        "they cannot change (vmid:…, or uuid:… where they cannot set it)",
        "p.yaml:11: vms.name:ops-1.tags: gives a tag of group 'g3' (domain 'globex') by the "
        "VM's name, which tenants control on this host (identity.tenant_controlled)",
    ]


def test_tenant_controlled_fields_are_named_exactly() -> None:
    found = problems("version: 1\nidentity: {tenant_controlled: [names, vmid]}\n")
    assert found == [
        "p.yaml:2: identity.tenant_controlled.0: unknown field 'names' (did you mean 'name'?): "
        "one of name, uuid, images, tags",
        "p.yaml:2: identity.tenant_controlled.1: unknown field 'vmid': one of name, uuid, "
        "images, tags",
    ]
    assert policy("version: 1\n").identity.tenant_controlled == ("tags",)
    assert policy(
        "version: 1\nidentity: {tenant_controlled: name}\n"
    ).identity.tenant_controlled == (
        "tags",
        "name",
    )


# --- names of domains and groups -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('domains: {"acme\\n": {}}', "domains.acme\\u000a: a domain name is 1-64"),
        ('groups: {"web\\n": {names: [w]}}', "groups.web\\u000a: a group name is 1-64"),
        ("groups: {'web farm': {names: [w]}}", "groups.web farm: a group name is 1-64"),
        ("domains: {default: {priority: 5}}", "domains.default: 'default' is ksmpolicy's own"),
        ("domains: {host: {}}", "domains.host: 'host' is ksmpolicy's own"),
    ],
)
def test_domain_and_group_names(text: str, message: str) -> None:
    found = problems("version: 1\n" + text + "\n")
    assert len(found) == 1 and message in found[0], found


# --- the property: a VM's domain is its operator-controlled identity's, or a conflict --------

NAMES = ["web-1", " web-1\t", "WEB-1", "101", "4107", UUID_A, UUID_B, "cust-7"]
UUIDS = [None, UUID_A, UUID_B]
VMIDS = [None, "101", "4107"]
TAGS = ["web", "acme", "globex", "101", UUID_A]
IMAGES = ["/img/provider-debian.qcow2", "/img/cust.qcow2"]
DOMAIN_NAMES = ["acme", "globex", "provider"]

key_st = st.one_of(
    st.sampled_from([u for u in UUIDS if u]).map(lambda u: f"uuid:{u}"),
    st.sampled_from([v for v in VMIDS if v]).map(lambda v: f"vmid:{v}"),
    st.sampled_from(NAMES).map(lambda n: f"name:{n}"),
)
group_st = st.builds(
    lambda i, names, tags, images, domain: Group(
        f"g{i}", images=tuple(images), tags=tuple(tags), names=tuple(names), domain=domain
    ),
    st.integers(0, 99),
    st.lists(st.sampled_from([*NAMES, "cust-*", "*-1"]), max_size=2),
    st.lists(st.sampled_from(TAGS), max_size=2),
    st.lists(st.sampled_from(["/img/provider-*", "/img/*"]), max_size=1),
    st.one_of(st.none(), st.sampled_from(DOMAIN_NAMES)),
)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    from ksmpolicy.policy.model import Domain

    groups = {g.name: g for g in draw(st.lists(group_st, max_size=4))}
    keys = draw(st.lists(key_st, max_size=5, unique=True))
    vm_domains = {k: draw(st.sampled_from(DOMAIN_NAMES)) for k in keys if draw(st.booleans())}
    vms = {k: tuple(draw(st.lists(st.sampled_from(TAGS), max_size=2))) for k in keys}
    return Policy(
        groups=tuple(groups.values()),
        vms={k: v for k, v in vms.items() if v},
        domains=tuple(Domain(d) for d in DOMAIN_NAMES),
        vm_domains=vm_domains,
    )


facts_st = st.builds(
    VmFacts,
    name=st.sampled_from(NAMES),
    uuid=st.sampled_from(UUIDS),
    vmid=st.sampled_from(VMIDS),
    tags=st.lists(st.sampled_from(TAGS), max_size=3).map(frozenset),
    images=st.lists(st.sampled_from(IMAGES), max_size=1).map(tuple),
)


def expected_domain(p: Policy, vm: VmFacts) -> str:
    """The identity model written as plainly as possible: fixed identities (uuid, vmid), then
    the operator's name entry, then groups joined by name, image or a tag the policy gives;
    the VM's own tags never count; disagreement at the deciding rank is a conflict."""
    mine = {f"name:{vm.name}"}
    fixed = {f"uuid:{vm.uuid}" if vm.uuid else None, f"vmid:{vm.vmid}" if vm.vmid else None}
    given = {t for k, tags in p.vms.items() if k in mine | fixed for t in tags}
    ranks = [
        {d for k, d in p.vm_domains.items() if k in fixed},
        {d for k, d in p.vm_domains.items() if k in mine},
        {
            g.domain
            for g in p.groups
            if g.domain
            and (
                any(fnmatch.fnmatchcase(vm.name, n) for n in g.names)
                or any(fnmatch.fnmatchcase(i, n) for i in vm.images for n in g.images)
                or set(g.tags) & given
            )
        },
    ]
    for found in ranks:
        if len(found) > 1:
            return CONFLICT_DOMAIN
        if found:
            return found.pop()
    return DEFAULT_DOMAIN


@settings(max_examples=600, deadline=None)
@given(policies(), facts_st, st.lists(st.sampled_from(TAGS), max_size=3).map(frozenset))
def test_a_vms_domain_is_its_operator_controlled_identitys(
    p: Policy, vm: VmFacts, other_tags: frozenset[str]
) -> None:
    decider = Decider(p)
    decision = decider.decide(vm)
    assert decision.domain == expected_domain(p, vm)
    if decision.domain == CONFLICT_DOMAIN:
        assert not decision.merge and not decision.definition_merges
    # whatever tags the VM gives itself, its domain stays
    from ksmpolicy.records import replace

    assert decider.decide(replace(vm, tags=other_tags)).domain == decision.domain


# --- the policy cache, by field name ---------------------------------------------------------


@st.composite
def policy_texts(draw: st.DrawFn) -> str:
    """Valid policies with every section drawn at random."""
    lines = ["version: 1"]
    lines.append(f"enforcement: {draw(st.sampled_from(['off', 'warn', 'block']))}")
    lines.append(f"live: {draw(st.booleans())}".lower())
    lines.append(f"default: {draw(st.sampled_from(['merge', 'exclude']))}")
    domains = draw(st.lists(st.sampled_from(DOMAIN_NAMES), max_size=3, unique=True))
    if domains:
        lines.append("domains:")
        for d in domains:
            prio = draw(st.integers(-1000, 1000))
            nodes = draw(st.lists(st.integers(0, 3), max_size=2, unique=True))
            lines.append(f"  {d}: {{priority: {prio}, nodes: {nodes or [0]}}}")
    lines.append("groups:")
    lines.append("  web: {names: ['web-*'], tags: [web]}")
    if domains:
        lines.append(f"  prov: {{images: ['/img/*'], domain: {domains[0]}}}")
    lines.append("rules:")
    for i in range(draw(st.integers(1, 3))):
        tags = draw(st.lists(st.sampled_from(["db", "web", "x"]), min_size=1, max_size=2))
        kinds = draw(st.lists(st.sampled_from(["qemu", "service"]), max_size=1))
        match = f"tags: {tags}" + (f", kinds: {kinds}" if kinds else "")
        action = draw(st.sampled_from(["merge", "exclude"]))
        lines.append(f"  - {{name: r{i}, match: {{{match}}}, action: {action}}}")
    lines.append("vms:")
    lines.append(
        f"  uuid:{UUID_A}: {{tags: [db]" + (f", domain: {domains[0]}}}" if domains else "}")
    )
    lines.append("  vmid:101: {tags: [web]}")
    lines.append("  name:shop: {tags: [x]}")
    lines.append("reconciler:")
    lines.append(f"  interval_seconds: {draw(st.floats(0.1, 3600)):.3f}")
    lines.append(f"  max_ksmd_cpu_percent: {draw(st.floats(0.1, 100)):.2f}")
    lines.append(f"  kernel_advisor: {str(draw(st.booleans())).lower()}")
    lines.append(f"  use_zero_pages: {str(draw(st.booleans())).lower()}")
    lines.append("isolation:")
    lines.append(f"  merge_across_nodes: {str(draw(st.booleans())).lower()}")
    lines.append(f"  stickiness_percent: {draw(st.integers(0, 1000))}")
    lines.append("proxmox: {qemu_server_version: '9.0.27'}")
    fields = draw(st.lists(st.sampled_from(["tags", "name"]), min_size=1, max_size=2, unique=True))
    lines.append(f"identity: {{tenant_controlled: {fields}}}")
    return "\n".join(lines) + "\n"


@settings(max_examples=200, deadline=None)
@given(policy_texts())
def test_the_cache_round_trips_every_field(text: str) -> None:
    parsed = parse_policy(text, "p.yaml")
    thawed = policy_load.thaw(policy_load.freeze(parsed))
    assert thawed == parsed
    assert isinstance(thawed, Policy)
    assert dict(thawed.vms) == dict(parsed.vms) and dict(thawed.vm_domains) == dict(
        parsed.vm_domains
    )


def test_the_cache_round_trips_the_shipped_policies() -> None:
    for path in sorted(Path(__file__).resolve().parents[2].joinpath("policies").glob("*.yaml")):
        parsed = parse_policy(path.read_text(), str(path))
        assert policy_load.thaw(policy_load.freeze(parsed)) == parsed, path.name
