"""Who a VM is: the kinds of identity a policy may name, and who controls each.

A VM has several fields a policy could key on, and they differ in who can set them:

* `vmid`: a Proxmox VE VM's number, assigned by the operator or the cluster when the VM is
  created; nobody changes it afterwards.
* `uuid`: libvirt's `<uuid>` (whoever defines the VM), Proxmox's `smbios1: uuid=` (settable by
  users with `VM.Config.HWType`).
* `name`: libvirt's `<name>` (whoever defines the VM; a panel may let tenants rename), Proxmox's
  `name:` (users with `VM.Config.Options`).
* `images`: the declared backing chain (libvirt), the disk volumes (Proxmox).
* `tags`: a VM's own labels (libvirt `<metadata>`, Proxmox `tags:`): whoever edits the VM.

So a `vms:` key names exactly one kind (`uuid:…`, `vmid:…`, `name:…`) and matches only an
identity of that kind, compared as the platform stores it (names exactly; UUIDs in lower case,
as libvirt and QEMU print them). A bare key is accepted only where it cannot mean two things:
text that could be a UUID or a VMID as well as a name must say which it is.

A trust domain comes from bindings, ranked by how trustworthy their field is (see
`BINDING_RANKS`); a VM's own tags never bind. Which fields tenants control on a host is the
policy's `identity.tenant_controlled`; `check` refuses a binding that rests on one of them.
No I/O; on the hook's path, so no `re` at import.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ksmpolicy.policy.model import Group

KINDS = ("uuid", "vmid", "name")
# Fields a policy may declare tenant-controlled. `tags` (a VM's own labels) always are: they
# never decide a trust domain, whatever the policy says. `vmid` never is.
FIELDS = ("name", "uuid", "images", "tags")
ALWAYS_TENANT_CONTROLLED = ("tags",)

# Domain bindings, from the most trustworthy: a `vms:` entry keyed by a fixed identity, one
# keyed by the operator's name for the VM, then a group with a domain (joined by name, image or
# a tag the policy itself gives). The highest rank present decides; bindings of that rank that
# disagree make the VM unmergeable (an identity conflict), never a guess.
RANK_FIXED = 3  # vms: uuid:…, vmid:…
RANK_NAME = 2  # vms: name:…
RANK_GROUP = 1  # groups with a domain
RANK_NAMES = {RANK_FIXED: "fixed identity", RANK_NAME: "name entry", RANK_GROUP: "group"}

_HEX = frozenset("0123456789abcdefABCDEF")
VMID_MIN, VMID_MAX = 100, 999_999_999  # qemu-server's pve-vmid: [1-9][0-9]{2,8}


def is_uuid(text: str) -> bool:
    """8-4-4-4-12 hexadecimal digits: the form libvirt and Proxmox store and print."""
    parts = text.split("-")
    return [len(p) for p in parts] == [8, 4, 4, 4, 12] and all(c in _HEX for p in parts for c in p)


def is_vmid(text: str) -> bool:
    """A Proxmox VMID as qemu-server writes it: ASCII digits, no leading zero, 100-999999999."""
    return (
        text.isascii() and text.isdigit() and text[0] != "0" and VMID_MIN <= int(text) <= VMID_MAX
    )


def key(kind: str, value: str) -> str:
    """The canonical form of a typed identity, as the compiled policy stores `vms:` keys."""
    return f"{kind}:{value.lower() if kind == 'uuid' else value}"


def parse_key(text: str) -> tuple[str, str] | str:
    """A `vms:` key as written -> (kind, canonical key), or why it cannot be used."""
    kind, sep, value = text.partition(":")
    if sep:
        problem = _typed_problem(kind, value, text)
        return problem if problem else (kind, key(kind, value))
    problem = _bare_problem(text)
    return problem if problem else ("name", key("name", text))


def _typed_problem(kind: str, value: str, text: str) -> str | None:
    """Why `kind:value` is no key, or None."""
    if kind not in KINDS:
        close = next((k for k in KINDS if k == kind.lower().strip()), None)
        hint = f" (did you mean '{close}:'?)" if close else ""
        return (
            f"unknown kind of identity {kind!r}{hint}: a key is 'uuid:UUID', 'vmid:VMID' or "
            f"'name:NAME' (a VM whose name holds ':' is 'name:{text}')"
        )
    if kind == "uuid" and not is_uuid(value):
        return f"{value!r} is not a UUID (8-4-4-4-12 hexadecimal digits)"
    if kind == "vmid" and not is_vmid(value):
        return (
            f"{value!r} is not a Proxmox VMID ({VMID_MIN}-{VMID_MAX}, digits only, no leading zero)"
        )
    if kind == "name" and not value:
        return "an empty name: no VM is named so"
    return None


def _bare_problem(text: str) -> str | None:
    """Why a key without a kind cannot be read as a name alone, or None."""
    if not text:
        return "an empty key: no VM is named so"
    if is_uuid(text):
        return (
            f"could be a VM's UUID or its name: write 'uuid:{text}' (the VM with this UUID) "
            f"or 'name:{text}' (a VM named so)"
        )
    if text.isdigit() and not is_vmid(text):
        return f"could be a VM's name, but looks like a number: write 'name:{text}'"
    if text.isdigit():
        return (
            f"could be a Proxmox VMID or a VM's name: write 'vmid:{text}' (VM {text}) or "
            f"'name:{text}' (a VM named so)"
        )
    return None


def vm_keys(name: str, uuid: str | None, vmid: str | None) -> tuple[tuple[int, str], ...]:
    """(rank, canonical key) of each identity a VM has, for `vms:` lookups: its VMID and UUID
    (fixed), its name (exactly as the platform stores it)."""
    found = []
    if vmid:
        found.append((RANK_FIXED, key("vmid", vmid)))
    if uuid:
        found.append((RANK_FIXED, key("uuid", uuid)))
    if name:
        found.append((RANK_NAME, key("name", name)))
    return tuple(found)


def field_of(canonical: str) -> str:
    """The field a canonical `vms:` key rests on: `uuid`, `vmid` or `name`."""
    return canonical.partition(":")[0]


def rank_of(canonical: str) -> int:
    return RANK_NAME if field_of(canonical) == "name" else RANK_FIXED


def tenant_bindings(
    tenant_controlled: Iterable[str],
    groups: Iterable[Group],
    tags: Mapping[str, tuple[str, ...]],
    in_domain: Mapping[str, str],
) -> list[tuple[str, str, str, str]]:
    """Every trust-domain binding that rests on a field tenants control, as (section, entry,
    key, message): `vms:` entries keyed by such a field that give a domain, or a tag of a
    group with a domain; groups with a domain joined by names or images tenants set."""
    tenant = set(tenant_controlled)
    why = "tenants control on this host (identity.tenant_controlled)"
    found = []
    for group in groups:
        if group.domain is None:
            continue
        for field_name, key in (("name", "names"), ("images", "images")):
            if field_name in tenant and getattr(group, key):
                message = f"joins VMs to domain {group.domain!r} by their {key}, which {why}"
                found.append(("groups", group.name, key, message))
    for vm_key, domain in in_domain.items():
        if field_of(vm_key) in tenant:
            message = (
                f"binds a VM to domain {domain!r} by its {field_of(vm_key)}, which {why}: key it "
                "by a field they cannot change (vmid:…, or uuid:… where they cannot set it)"
            )
            found.append(("vms", vm_key, "domain", message))
    for vm_key, given in tags.items():
        if field_of(vm_key) not in tenant:
            continue
        for group in groups:
            if group.domain is not None and set(given) & set(group.tags):
                message = (
                    f"gives a tag of group {group.name!r} (domain {group.domain!r}) by the VM's "
                    f"{field_of(vm_key)}, which {why}"
                )
                found.append(("vms", vm_key, "tags", message))
    return found
