"""Time grows linearly with input size on the XML and YAML paths (0.25, 1 and 4 MB).

Quadratic parsing (text gathered by `+=` per entity reference, one bit mask per rule) made
4 MB of `<description>` take 7.8 s where 1 MB took 0.47 s. Each step here is 4x the input;
linear time takes about 4x as long, quadratic 16x.

Time is measured against a reference that is linear and meets the same memory effects: the
underlying parser alone (expat, libyaml) or one pass over the rules, on the same input. Raw
times are not: 1 MB fits in the caches and 16 MB does not, so a linear path took 85x over a
16x range once in CI (expat alone takes 2-2.5x per doubling here). The ratio to the reference
grows at most 2.4x across the range for every linear path measured; a quadratic one grows it
16x (see `assert_linear`)."""

from __future__ import annotations

import functools
import pyexpat
import time
from collections.abc import Callable

import pytest
import yaml

from ksmpolicy.libvirt.domain import domain_facts
from ksmpolicy.libvirt.nosharepages import set_nosharepages
from ksmpolicy.policy.decide import Decider, VmFacts
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.policy.model import Policy

pytestmark = pytest.mark.slow  # a minute and more: `make test` runs it, `make test-fast` not

SIZES_MB: tuple[float, ...] = (0.25, 1, 4)
# How much the ratio to the reference may grow over the range: measured up to 2.4x for the linear
# paths (small inputs are noisier); quadratic is 16x, n**1.5 8x, n log n about 1.4x.
MAX_GROWTH = 6.0


def timed(action: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return max(best, 0.001)  # below this the clock's noise, not the algorithm, speaks


def assert_linear(times: list[float], references: list[float], what: str) -> None:
    """`times` grow at most MAX_GROWTH times faster than the linear `references` over the range."""
    ratios = [t / r for t, r in zip(times, references, strict=True)]
    growth = ratios[-1] / ratios[0]
    print(f"{what}: ratio to the reference {', '.join(f'{r:.2f}' for r in ratios)}")
    assert growth <= MAX_GROWTH, (
        f"{what}: {', '.join(f'{t:.3f} s' for t in times)} for {SIZES_MB} MB, against "
        f"{', '.join(f'{t:.3f} s' for t in references)} for the linear reference "
        f"(ratio grew {growth:.1f}x, at most {MAX_GROWTH}x)"
    )


def parse_and_rewrite(xml: str) -> None:
    domain_facts(xml)
    set_nosharepages(xml, True)


def expat_alone(xml: str) -> None:
    """The reference for the XML paths: expat handing every element and text to Python."""
    parser = pyexpat.ParserCreate()
    parser.StartElementHandler = lambda name, attributes: None
    parser.CharacterDataHandler = lambda data: None
    parser.Parse(xml.encode(), True)


def names_of_rules(policy: Policy) -> int:
    """The reference for deciding: one pass over the rules."""
    return sum(1 for rule in policy.rules if rule.name == "vm-7")


def decide_once(policy: Policy) -> None:
    Decider(policy).decide(VmFacts("vm-7", tags=frozenset({"t7"})))


XML_BODIES: dict[str, Callable[[int], str]] = {
    "entity references in <description>": lambda n: (
        f"<description>{'&amp;&lt;&#x41;' * (n // 15)}</description>"
    ),
    "elements under <devices>": lambda n: (
        "<devices>" + "<controller type='usb' index='0'/>" * (n // 35) + "</devices>"
    ),
    "disks": lambda n: (
        "<devices>"
        + "<disk type='file' device='disk'><source file='/i/a.qcow2'/><target dev='vda'/></disk>"
        * (n // 85)
        + "</devices>"
    ),
    "one long attribute": lambda n: f"<metadata note='{'x>' * (n // 2)}'/>",
    "quoted attributes holding '>'": lambda n: (
        "<devices>"
        + "<disk type='file' a='>' b=\"'>\" c='\"'><source file='/i/a.qcow2'/></disk>" * (n // 70)
        + "</devices>"
    ),
}


@pytest.mark.parametrize("shape", sorted(XML_BODIES))
def test_domain_xml_is_linear(shape: str) -> None:
    times: list[float] = []
    references: list[float] = []
    for mb in SIZES_MB:
        body = XML_BODIES[shape](int(mb * 2**20))
        xml = f"<domain type='kvm'>\n  <name>x</name>\n  {body}\n  <memory>1</memory>\n</domain>\n"
        times.append(timed(functools.partial(parse_and_rewrite, xml)))
        references.append(timed(functools.partial(expat_alone, xml)))
    assert_linear(times, references, shape)


def policy_text(size: int) -> str:
    entry = "  vm-{i:08d}: {{tags: [web, t{i}], description: '{pad}'}}\n"
    pad = "x" * 200
    count = size // len(entry.format(i=0, pad=pad))
    return "version: 1\nvms:\n" + "".join(entry.format(i=i, pad=pad) for i in range(count))


def test_policy_yaml_is_linear() -> None:
    times: list[float] = []
    references: list[float] = []
    for mb in SIZES_MB:
        text = policy_text(int(mb * 2**20))
        times.append(timed(functools.partial(parse_policy, text)))
        references.append(timed(functools.partial(yaml.compose, text, Loader=yaml.CSafeLoader)))
    assert_linear(times, references, "vms: entries")


def test_deciding_is_linear_in_the_number_of_rules() -> None:
    times: list[float] = []
    references: list[float] = []
    for mb in SIZES_MB:
        count = int(mb * 10_000)
        rules = "".join(
            f"  - {{name: r{i}, match: {{names: [vm-{i}], tags: [t{i % 50}]}}, action: exclude}}\n"
            for i in range(count)
        )
        policy = parse_policy("version: 1\nrules:\n" + rules)
        times.append(timed(functools.partial(decide_once, policy)))
        references.append(timed(functools.partial(names_of_rules, policy)))
    assert_linear(times, references, "rules")
