"""Commands about the policy itself: `check` and `explain`."""

from __future__ import annotations

import json

import click

from ksmpolicy.cli.common import (
    Options,
    count,
    policy_option,
    read_input,
    read_pve_config,
    vmid_for,
)
from ksmpolicy.cli.render import decision_json, decision_table, decision_text
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.decide import Decider, MemoryRegion, VmFacts
from ksmpolicy.policy.factsfile import load_facts
from ksmpolicy.policy.load import BUILTIN_NAME, load_policy, load_policy_or_builtin


@click.command()
@click.argument("files", nargs=-1, metavar="[POLICY]...")
@click.option(
    "--print-default",
    is_flag=True,
    help="Print the shipped default policy (to install it: `ksmpolicy check --print-default "
    "> /etc/ksmpolicy/policy.yaml`).",
)
@policy_option
@click.pass_obj
def check(options: Options, files: tuple[str, ...], print_default: bool) -> None:
    """Validate policy files and report every problem.

    Checks the given files, else the policy in use (--policy). Problems are
    printed one per line as FILE:LINE: key: message. Exit 0 when all are valid,
    1 otherwise. With no file anywhere, says what every command would use: the
    built-in default (the shipped policy with enforcement and live switching off).
    """
    if print_default:
        from importlib.resources import files as package_files  # noqa: PLC0415

        text = package_files("ksmpolicy.policy").joinpath("default.yaml").read_text("utf-8")
        click.echo(text, nl=False)
        return
    failed = False
    for file in files or (options.policy_path(),):
        try:
            if files:
                policy = load_policy(file)
            else:
                policy = load_policy_or_builtin(file, explicit=options.explicit)
        except KsmPolicyError as exc:
            click.echo(str(exc), err=True)
            failed = True
            continue
        if policy.source.startswith(BUILTIN_NAME):
            click.echo(
                f"no policy file at {file}: every command uses the {BUILTIN_NAME} (the shipped "
                "policy with enforcement off and live off: hooks change no VM, the daemon only "
                "paces ksmd); install one with `ksmpolicy check --print-default > "
                f"{file}`, then edit it"
            )
        click.echo(
            f"{policy.source if policy.source.startswith(BUILTIN_NAME) else file}: ok "
            f"({count(policy.rules, 'rule')}, {count(policy.groups, 'group')}, "
            f"{count(set(policy.vms) | set(policy.vm_domains), 'VM')} named; "
            f"default {policy.default.value}, "
            f"enforcement {policy.enforcement.value})"
        )
        if policy.uses_domains or policy.isolation.merge_across_nodes is not None:
            from ksmpolicy.trust.scopes import describe, read_host  # noqa: PLC0415

            for line in describe(policy, read_host(HostPaths())):
                click.echo(f"  {line}")
    if failed:
        raise SystemExit(1)


@click.command()
@click.option("--name", "-n", metavar="NAME", help="VM name (libvirt domain or Proxmox name).")
@click.option("--uuid", metavar="UUID", help="VM UUID, for `vms:` entries keyed by UUID.")
@click.option("--vmid", metavar="VMID", help="Proxmox VMID, for `vms:` entries keyed by VMID.")
@click.option("--tag", "-t", "tags", multiple=True, metavar="TAG", help="A tag the VM carries.")
@click.option("--image", "images", multiple=True, metavar="IMAGE", help="Base image identity.")
@click.option("--hugepages", is_flag=True, help="The VM's memory is hugepage-backed.")
@click.option("--facts", "facts_file", metavar="FILE", help="A YAML list of VMs: print a table.")
@click.option(
    "--xml", "xml_file", metavar="FILE", help="A libvirt domain XML file ('-' for stdin)."
)
@click.option(
    "--pve-conf",
    "pve_file",
    metavar="FILE",
    help="A Proxmox VE config (/etc/pve/qemu-server/VMID.conf).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@policy_option
@click.pass_obj
def explain(  # noqa: PLR0913 - one parameter per option of the command
    options: Options,
    name: str | None,
    uuid: str | None,
    vmid: str | None,
    tags: tuple[str, ...],
    images: tuple[str, ...],
    hugepages: bool,
    facts_file: str | None,
    xml_file: str | None,
    pve_file: str | None,
    as_json: bool,
) -> None:
    """Show what the policy decides for a VM, and why.

    Describe one VM with --name (and --tag, --image, ...), give its libvirt
    definition with --xml FILE (tags from its <metadata>, images from its
    disks' backing chains), or many VMs with --facts FILE, a YAML list like
    `- {name: web-1, tags: [web]}`.

    \b
    Example:
      ksmpolicy explain --name pg-primary --tag database
    """
    sources = [s for s in (name, facts_file, xml_file, pve_file) if s is not None]
    if not sources:
        raise click.UsageError(
            "give --name NAME (with --tag, --image, ...), --xml, --pve-conf or --facts"
        )
    if len(sources) > 1:
        raise click.UsageError("--name, --xml, --pve-conf and --facts exclude each other")
    policy = options.load()
    decider = Decider(policy)
    if facts_file is not None:
        vms = load_facts(facts_file)
    elif xml_file is not None:
        from ksmpolicy.libvirt.domain import domain_facts  # noqa: PLC0415
        from ksmpolicy.libvirt.images import qcow2_backing_root  # noqa: PLC0415

        vms = [domain_facts(read_input(xml_file), qcow2_backing_root).vm]
    elif pve_file is not None:
        from ksmpolicy.proxmox import conf  # noqa: PLC0415

        vmid = vmid_for(pve_file, vmid)
        config = conf.parse(read_pve_config(pve_file, "give a domain XML with --xml"))
        vms = [conf.facts(config, vmid).vm]
        pending = conf.with_pending(config)
        if pending is not None and not as_json:
            later = decider.decide(conf.facts(config, vmid, pending).vm)
            if later.action is not decider.decide(vms[0]).action:
                click.echo(f"note: the [PENDING] changes would make it {later.action.value}")
    else:
        assert name is not None
        ram = (MemoryRegion("ram", hugepages=True),) if hugepages else ()
        vms = [VmFacts(name, uuid, vmid, frozenset(tags), images, regions=ram)]
    decisions = [decider.decide(vm) for vm in vms]
    if as_json:
        click.echo(json.dumps([decision_json(d) for d in decisions], indent=2))
    elif facts_file is None:
        click.echo(decision_text(decisions[0], policy))
    else:
        click.echo(decision_table(decisions))
