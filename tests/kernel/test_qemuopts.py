"""QEMU's option syntax: one reader for the scan and the QMP socket finder."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ksmpolicy.kernel.qemuopts import option_map, options, qemu_bool
from ksmpolicy.kernel.qmp import socket_of
from ksmpolicy.kernel.vmm import parse_qemu_cmdline


def test_doubled_commas_are_commas_in_the_value() -> None:
    assert options("guest=a,,,x=1") == [("guest", "a,"), ("x", "1")]
    assert options("guest=a,,b,debug-threads=on") == [("guest", "a,b"), ("debug-threads", "on")]
    assert options("web,,1") == [("", "web,1")]
    assert options("a=,,,,") == [("a", ",,")]


def test_implied_key_short_booleans_and_the_last_value() -> None:
    assert options("socket,id=m,path=/p,server,nowait") == [
        ("", "socket"),
        ("id", "m"),
        ("path", "/p"),
        ("server", "on"),
        ("wait", "off"),
    ]
    assert option_map("pc,mem-merge=off,mem-merge=on")["mem-merge"] == "on"


def test_a_vm_whose_name_holds_commas_is_named_as_qemu_reads_it() -> None:
    """The scan cut `guest=a,,,debug-threads=on` wrongly, so the VM `a,` was misidentified."""
    argv = ["qemu-system-x86_64", "-name", "guest=a,,,debug-threads=on", "-m", "512"]
    name, _uuid, _vmid, ram, _merge = parse_qemu_cmdline(argv)
    assert (name, ram) == ("a,", 512 << 20)


def test_the_last_machine_option_decides_mem_merge() -> None:
    argv = ["qemu", "-machine", "pc,mem-merge=off", "-machine", "mem-merge=y"]
    assert parse_qemu_cmdline(argv)[4] is True
    argv = ["qemu", "-machine", "pc,mem-merge=on", "-machine", "accel=tcg,mem-merge=no"]
    assert parse_qemu_cmdline(argv)[4] is False
    assert parse_qemu_cmdline(["qemu", "-machine", "pc,mem-merge=maybe"])[4] is None


def test_booleans_as_qemu_reads_them() -> None:
    assert [qemu_bool(v) for v in ("on", "yes", "true", "y")] == [True] * 4
    assert [qemu_bool(v) for v in ("off", "no", "false", "n")] == [False] * 4
    assert [qemu_bool(v) for v in ("ON", "1", "", None)] == [None] * 4


def test_the_qmp_socket_is_found_through_the_same_reader() -> None:
    argv = [
        "kvm",
        "-chardev",
        "socket,id=qmp,path=/run/qemu-server/101.qmp,,x,server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    assert socket_of(argv) == "/run/qemu-server/101.qmp,x"


values = st.text(alphabet=st.sampled_from("ab,=x "), max_size=6)
keys = st.text(alphabet=st.sampled_from("abk-"), min_size=1, max_size=4)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=5))
def test_what_qemu_would_be_given_comes_back(pairs: list[tuple[str, str]]) -> None:
    """Written the way libvirt writes an option (each comma in a value doubled), every pair
    reads back as it was."""
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in pairs)
    assert options(text) == pairs


def test_every_spelling_of_machine_counts_and_a_value_is_no_flag() -> None:
    """`-M` is `-machine`'s short form and QEMU reads `--opt` as `-opt`: the scan missed
    `-M pc,mem-merge=off` and called the VM mergeable."""
    assert parse_qemu_cmdline(["qemu", "-M", "pc,mem-merge=off"])[4] is False
    assert parse_qemu_cmdline(["qemu", "--machine", "mem-merge=off"])[4] is False
    assert parse_qemu_cmdline(["qemu", "-machine", "mem-merge=off", "--M", "mem-merge=on"])[4]
    # -M's value is `-machine`; what follows is a disk image, not an option
    assert parse_qemu_cmdline(["qemu", "-M", "-machine", "mem-merge=off"])[4] is None
