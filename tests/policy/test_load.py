"""Policy loading and validation: every message pinned, file and line included."""

from __future__ import annotations

import os
import re
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ksmpolicy.errors import PolicyError
from ksmpolicy.policy.load import load_policy, parse_policy
from ksmpolicy.policy.model import Action, Enforcement, Group, Match, ReconcilerSettings, Rule


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(textwrap.dedent(text), "p.yaml")
    return str(info.value).splitlines()


def test_full_policy_loads_into_values() -> None:
    policy = parse_policy(
        textwrap.dedent(
            """\
            version: 1
            enforcement: block
            live: false
            default: exclude
            groups:
              ubuntu:
                images: ["/var/lib/libvirt/images/ubuntu-24.04*.qcow2"]
              win: {tags: [Win2022]}
            rules:
              - name: dbs
                match: {tags: [database, latency-sensitive]}
                action: exclude
              - match: {groups: [ubuntu], names: ["web-*"]}
                action: merge
            vms:
              pg-primary: {tags: [database]}
              vmid:101: {tags: [web]}
              uuid:9B4E5C2A-0000-4000-8000-00000000000A: {tags: [x]}
            reconciler:
              interval_seconds: 5
              target_scan_seconds: 60
              max_ksmd_cpu_percent: 12.5
            """
        ),
        "p.yaml",
    )
    assert policy.enforcement is Enforcement.BLOCK
    assert policy.live is False
    assert policy.default is Action.EXCLUDE
    assert policy.groups == (
        Group("ubuntu", images=("/var/lib/libvirt/images/ubuntu-24.04*.qcow2",)),
        Group("win", tags=("win2022",)),
    )
    assert policy.rules == (
        Rule("dbs", Match(tags=("database", "latency-sensitive")), Action.EXCLUDE, line=10),
        Rule("rules.1", Match(names=("web-*",), groups=("ubuntu",)), Action.MERGE, line=13),
    )
    assert policy.vms == {
        "name:pg-primary": ("database",),
        "vmid:101": ("web",),
        "uuid:9b4e5c2a-0000-4000-8000-00000000000a": ("x",),
    }
    assert policy.reconciler == ReconcilerSettings(5.0, 60.0, 12.5)
    assert policy.source == "p.yaml"


def test_minimal_policy_gets_safe_defaults() -> None:
    policy = parse_policy("version: 1\n")
    assert policy.enforcement is Enforcement.WARN
    assert policy.live is True
    assert policy.default is Action.MERGE
    assert policy.rules == ()
    assert policy.reconciler == ReconcilerSettings()


def test_bare_off_means_off_not_false() -> None:
    assert parse_policy("version: 1\nenforcement: off\n").enforcement is Enforcement.OFF


# Each case: policy text -> the exact lines printed. These are the user-facing messages.
CASES = {
    "typo in rule key": (
        """\
        version: 1
        rules:
          - name: dbs
            match: {tags: [database]}
            acton: exclude
        """,
        [
            "p.yaml:3: rules.0: missing 'action': add 'action: exclude' or 'action: merge'",
            "p.yaml:5: rules.0.acton: unknown key (did you mean 'action'?)",
        ],
    ),
    "unknown top-level key without a close match": (
        "version: 1\nzzz: 1\n",
        [
            "p.yaml:2: zzz: unknown key (allowed: version, enforcement, live, default, groups, "
            "rules, vms, reconciler, proxmox, domains, isolation, identity)"
        ],
    ),
    "missing version": (
        "default: merge\n",
        ["p.yaml:1: version: missing: add 'version: 1' as the first line"],
    ),
    "wrong version": (
        "version: 2\n",
        ["p.yaml:1: version: unsupported version 2: this ksmpolicy reads version 1"],
    ),
    "empty file": ("", ["p.yaml:1: policy is empty: start it with 'version: 1' (see policies/)"]),
    "comments only": (
        "# nothing\n",
        ["p.yaml:1: policy is empty: start it with 'version: 1' (see policies/)"],
    ),
    "list at top level": (
        "- version: 1\n",
        ["p.yaml:1: expected a mapping (key: value lines), got a list"],
    ),
    "yaml syntax error": (
        "version: 1\nrules: [\n",
        ["p.yaml:3: YAML syntax error: did not find expected node content"],
    ),
    "tab indentation": (
        "version: 1\nrules:\n\t- x\n",
        ["p.yaml:3: YAML syntax error: found character that cannot start any token"],
    ),
    "python object tag": (
        "version: 1\nlive: !!python/object/apply:os.system ['true']\n",
        [
            "p.yaml:2: live: unsupported YAML tag tag:yaml.org,2002:python/object/apply:os.system:"
            " use plain YAML",
        ],
    ),
    "custom tag on scalar": (
        "version: !env 1\n",
        [
            "p.yaml:1: version: unsupported YAML tag !env: use plain YAML",
        ],
    ),
    "duplicate key": (
        "version: 1\ndefault: merge\ndefault: exclude\n",
        ["p.yaml:3: default: duplicate key (first defined at line 2)"],
    ),
    "merge key": (
        "version: 1\nbase: &b {live: true}\n<<: *b\n",
        [
            "p.yaml:2: base: unknown key (allowed: version, enforcement, live, default, groups, "
            "rules, vms, reconciler, proxmox, domains, isolation, identity)",
            "p.yaml:3: YAML merge keys ('<<') are not supported",
        ],
    ),
    "list where a mapping belongs": (
        "version: 1\ngroups: [a, b]\n",
        ["p.yaml:2: groups: expected a mapping (key: value lines), got a list"],
    ),
    "mapping where a list belongs": (
        "version: 1\nrules: {name: x}\n",
        ["p.yaml:2: rules: expected a list of rules, got a mapping"],
    ),
    "rule with no match": (
        "version: 1\nrules:\n  - name: x\n    action: exclude\n",
        [
            "p.yaml:3: rules.0: missing 'match': say which VMs the rule is for (names, tags, "
            "groups, images, domains, kinds, units); use 'default:' for all others"
        ],
    ),
    "rule with empty match": (
        "version: 1\nrules:\n  - match: {}\n    action: exclude\n",
        ["p.yaml:3: rules.0.match: empty match would match every VM: use 'default:' for that"],
    ),
    "bad action with hint": (
        "version: 1\nrules:\n  - match: {tags: [a]}\n    action: exlude\n",
        [
            "p.yaml:4: rules.0.action: expected one of merge, exclude, got 'exlude' "
            "(did you mean 'exclude'?)"
        ],
    ),
    "bad enforcement": (
        "version: 1\nenforcement: strict\n",
        ["p.yaml:2: enforcement: expected one of off, warn, block, got 'strict'"],
    ),
    "live not a bool": (
        "version: 1\nlive: sometimes\n",
        ["p.yaml:2: live: expected true or false, got 'sometimes'"],
    ),
    "undefined group with hint": (
        "version: 1\ngroups:\n  ubuntu-2404: {tags: [u]}\n"
        "rules:\n  - match: {groups: [ubuntu-2040]}\n    action: merge\n",
        [
            "p.yaml:5: rules.0.match.groups.0: group 'ubuntu-2040' is not defined under "
            "'groups:' (did you mean 'ubuntu-2404'?)"
        ],
    ),
    "glob with empty range": (
        "version: 1\nrules:\n  - match: {names: ['db-[9-0]*']}\n    action: exclude\n",
        [
            "p.yaml:3: rules.0.match.names.0: glob 'db-[9-0]*' can never match: a character "
            "range like [z-a] is empty"
        ],
    ),
    "name glob with slash": (
        "version: 1\nrules:\n  - match: {names: ['prod/db']}\n    action: exclude\n",
        [
            "p.yaml:3: rules.0.match.names.0: glob 'prod/db' can never match: VM names never "
            "contain '/'"
        ],
    ),
    "empty glob": (
        "version: 1\nrules:\n  - match: {names: ['']}\n    action: exclude\n",
        ["p.yaml:3: rules.0.match.names.0: glob '' can never match: it is empty"],
    ),
    "relative image glob": (
        "version: 1\ngroups:\n  u:\n    images: [ubuntu*.qcow2]\n",
        [
            "p.yaml:4: groups.u.images.0: glob 'ubuntu*.qcow2' can never match: images are "
            "absolute paths (libvirt) or STORAGE:VOLUME ids (Proxmox); did you mean "
            "'*/ubuntu*.qcow2'?"
        ],
    ),
    "empty list": (
        "version: 1\nrules:\n  - match: {tags: []}\n    action: exclude\n",
        ["p.yaml:3: rules.0.match.tags: empty list matches nothing: remove the key or add items"],
    ),
    "tag with separator": (
        "version: 1\nvms:\n  web: {tags: ['a;b']}\n",
        ["p.yaml:3: vms.web.tags.0: tag 'a;b' contains ';': no VM can carry such a tag"],
    ),
    "vm without tags": (
        "version: 1\nvms:\n  web: {}\n",
        ["p.yaml:3: vms.web: missing 'tags' or 'domain': say what the entry gives"],
    ),
    "group with nothing": (
        "version: 1\ngroups:\n  g: {description: x}\n",
        ["p.yaml:3: groups.g: a group needs at least one of: images, tags, names"],
    ),
    "duplicate rule names": (
        "version: 1\nrules:\n  - {name: a, match: {tags: [x]}, action: merge}\n"
        "  - {name: a, match: {tags: [y]}, action: merge}\n",
        ["p.yaml:4: rules.1.name: duplicate rule name (first used at line 3)"],
    ),
    "reconciler out of range and wrong type": (
        "version: 1\nreconciler:\n  max_ksmd_cpu_percent: 200\n  interval_seconds: fast\n",
        [
            "p.yaml:3: reconciler.max_ksmd_cpu_percent: 200 is out of range: use 0.1 to 100",
            "p.yaml:4: reconciler.interval_seconds: expected a number, got a string ('fast')",
        ],
    ),
    "problems anywhere are all reported, in line order": (
        "version: 3\nlive: 1\nrules:\n  - match: {tagz: [a]}\n    action: merge\n",
        [
            "p.yaml:1: version: unsupported version 3: this ksmpolicy reads version 1",
            "p.yaml:2: live: expected true or false, got 1",
            "p.yaml:4: rules.0.match.tagz: unknown key (did you mean 'tags'?)",
            "p.yaml:4: rules.0.match: empty match would match every VM: use 'default:' for that",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_message(case: str) -> None:
    text, expected = CASES[case]
    assert problems(text) == expected


def test_alias_bomb_is_refused_before_any_expansion() -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    started = time.perf_counter()
    found = problems("\n".join(lines) + "\n")
    took = time.perf_counter() - started
    assert len(found) == 1
    assert re.fullmatch(
        r"p\.yaml:1: YAML aliases expand this document by [\d,]{15,} nodes "
        r"\(at most 1,000,000\): an alias bomb\?",
        found[0],
    ), found
    assert took < 0.1, f"refusing the bomb took {took:.2f} s"


def test_aliases_within_reason_still_work() -> None:
    text = "version: 1\ngroups:\n  a: {tags: &t [web, app]}\n  b: {tags: *t}\n"
    assert [g.tags for g in parse_policy(text).groups] == [("web", "app"), ("web", "app")]


def test_nesting_beyond_reason_is_refused() -> None:
    deep = "version: 1\nx:\n" + "".join(f"{'  ' * (i + 1)}k{i}:\n" for i in range(80)) + "\n"
    assert problems(deep) == ["p.yaml:1: nested deeper than 64 levels: not a policy"]


def test_scalar_single_string_is_a_list_of_one() -> None:
    policy = parse_policy("version: 1\nrules:\n  - {match: {tags: database}, action: exclude}\n")
    assert policy.rules[0].match.tags == ("database",)


# --- files


def test_load_policy_reads_file(write_policy: Callable[..., Path]) -> None:
    path = write_policy("version: 1\n")
    assert load_policy(path).source == str(path)


def test_missing_file() -> None:
    with pytest.raises(PolicyError, match=r"^/nonexistent/p\.yaml: no such file$"):
        load_policy("/nonexistent/p.yaml")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is a directory, expected a policy file"):
        load_policy(tmp_path, check_trust=False)


def test_file_over_32_mb_is_refused(write_policy: Callable[..., Path]) -> None:
    path = write_policy("version: 1\n" + "#" * (32 * 1024 * 1024) + "\n")
    with pytest.raises(PolicyError, match=r"larger than 32 MB: not a policy$"):
        load_policy(path, check_trust=False)


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path, check_trust=False)
    assert str(info.value) == f"{path}:2: not valid UTF-8 (byte 16): save it as UTF-8"


def test_nul_bytes_refused() -> None:
    assert problems("version: 1\n# a\0b\n") == ["p.yaml:2: contains a NUL byte: not a text file"]


def test_control_character_names_the_line() -> None:
    assert problems("version: 1\n# a\x07b\n") == [
        "p.yaml:2: control character U+0007 is not allowed in YAML"
    ]


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_writable_by_others_is_refused(write_policy: Callable[..., Path], mode: int) -> None:
    path = write_policy("version: 1\n")
    path.chmod(mode)
    who = "everyone" if mode & 0o002 else "its group"
    with pytest.raises(PolicyError) as info:
        load_policy(path, check_trust=True)
    assert str(info.value) == (
        f"{path}: refusing it: hooks run as root and act on it, but {path} is writable by "
        f"{who} (mode {mode:04o}); run: chmod go-w {path}"
    )


@pytest.mark.root
def test_not_owned_by_root_is_refused(write_policy: Callable[..., Path]) -> None:
    path = write_policy("version: 1\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(PolicyError, match=r"policy.yaml \(file\) belongs to uid 65534; run: chown"):
        load_policy(path, check_trust=True)


@pytest.mark.root
def test_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = shared / "policy.yaml"
    path.write_text("version: 1\n")
    path.chmod(0o644)
    with pytest.raises(
        PolicyError, match=r"shared is writable by everyone \(mode 0777\), who could"
    ):
        load_policy(path, check_trust=True)


def test_trust_is_not_checked_for_non_root_by_default(write_policy: Callable[..., Path]) -> None:
    path = write_policy("version: 1\n")
    path.chmod(0o666)
    if os.geteuid() == 0:
        with pytest.raises(PolicyError, match="is writable by everyone"):
            load_policy(path)
    else:
        assert load_policy(path).version == 1


def test_compiled_cache_is_used_and_follows_changes(
    write_policy: Callable[..., Path], tmp_path: Path
) -> None:
    """The hook's cache: one file per policy path, refreshed when the file changes."""
    cache = tmp_path / "run"
    path = write_policy("version: 1\ndefault: exclude\n")
    first = load_policy(path, cache_dir=str(cache))
    files = list(cache.iterdir())
    assert len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o600
    assert load_policy(path, cache_dir=str(cache)) == first
    path.write_text("version: 1\ndefault: merge\n")  # same inode, new size and mtime
    assert load_policy(path, cache_dir=str(cache)).default.value == "merge"
    replacement = tmp_path / "new.yaml"
    replacement.write_text("version: 1\nenforcement: block\n")
    replacement.chmod(0o644)
    replacement.rename(path)  # a new inode, as editors save
    assert load_policy(path, cache_dir=str(cache)).enforcement.value == "block"
    assert len(list(cache.iterdir())) == 1


def test_a_cache_others_could_write_is_ignored(
    write_policy: Callable[..., Path], tmp_path: Path
) -> None:
    """A cache entry forged by someone who could write it must not change the decision."""
    import marshal

    from ksmpolicy.policy import load as policy_module

    cache = tmp_path / "run"
    path = write_policy("version: 1\ndefault: exclude\n")
    load_policy(path, cache_dir=str(cache))
    (cached,) = cache.iterdir()
    fmt, key, _frozen = marshal.loads(cached.read_bytes())
    forged: Any = (fmt, key, policy_module.freeze(parse_policy("version: 1\ndefault: merge\n")))
    cached.write_bytes(marshal.dumps(forged))
    cached.chmod(0o666)
    assert load_policy(path, cache_dir=str(cache)).default.value == "exclude"
    cached.write_bytes(marshal.dumps(forged))
    cached.chmod(0o600)  # the same entry, as only root could have written it, is used
    assert load_policy(path, cache_dir=str(cache)).default.value == "merge"


def test_proxmox_section() -> None:
    policy = parse_policy("version: 1\nproxmox: {qemu_server_version: '8.4.1'}\n")
    assert policy.proxmox.qemu_server_version == "8.4.1"
    assert problems("version: 1\nproxmox: {qemu_server_version: latest}\n") == [
        "p.yaml:2: proxmox.qemu_server_version: expected a version like 8.4.1 (quote it), "
        "got 'latest'"
    ]
    assert problems("version: 1\nproxmox: {qemu_version: '9'}\n") == [
        "p.yaml:2: proxmox.qemu_version: unknown key (did you mean 'qemu_server_version'?)"
    ]


def test_use_zero_pages_key() -> None:
    assert parse_policy("version: 1\n").reconciler.use_zero_pages is True  # measured default
    assert parse_policy("version: 1\nreconciler: {use_zero_pages: yes}\n").reconciler.use_zero_pages
    off = parse_policy("version: 1\nreconciler: {use_zero_pages: false}\n")
    assert off.reconciler.use_zero_pages is False
    assert problems("version: 1\nreconciler: {use_zero_pages: sometimes}\n") == [
        "p.yaml:2: reconciler.use_zero_pages: expected true or false, got 'sometimes'"
    ]
