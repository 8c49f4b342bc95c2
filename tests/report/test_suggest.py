"""`estimate`'s suggested groups pass `check` and match their VMs, whatever the names hold:
slashes, glob characters, quotes, spaces, control and format characters, any script."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ksmpolicy.policy.decide import Decider, VmFacts
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.report.estimate import SuggestedGroup, _group_name
from ksmpolicy.report.render import yaml_snippet

HOSTILE = st.text(
    st.one_of(
        st.sampled_from("/*?[]!-_. \\\"'#:{},&|>%@`\t\n\r\0\x85\u2028\u202e\ufeff\U0001f600é日"),
        st.characters(),
    ),
    min_size=1,
    max_size=40,
)


def suggested(clusters: list[list[str]]) -> list[SuggestedGroup]:
    taken: set[str] = set()
    found = []
    for names in clusters:
        name = _group_name(sorted(names), taken)
        taken.add(name)
        found.append(SuggestedGroup(name, tuple(sorted(names)), 2**20))
    return found


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(HOSTILE, min_size=2, max_size=4), min_size=1, max_size=3))
def test_suggestions_load_validate_and_match_their_vms(clusters: list[list[str]]) -> None:
    groups = suggested(clusters)
    policy = parse_policy("version: 1\n" + yaml_snippet(groups))  # raises on any problem
    assert [g.name for g in policy.groups] == [g.name for g in groups]
    decider = Decider(policy)
    for group in groups:
        for name in group.vms:
            assert decider.decide(VmFacts(name=name)).group in {g.name for g in groups}


def test_names_with_slashes_globs_and_quotes() -> None:
    names = ["web/1", "web/2", 'we"b*[1]', "web\\\u202e"]
    (group,) = suggested([names])
    assert group.name == "we"
    snippet = yaml_snippet([group])
    assert snippet.isascii()
    policy = parse_policy("version: 1\n" + snippet)
    decider = Decider(policy)
    assert {decider.decide(VmFacts(name=n)).group for n in names} == {"we"}
    assert decider.decide(VmFacts(name='we"b*[1]x')).group is None  # wildcards stay literal


def test_a_group_name_from_any_script_passes_check() -> None:
    assert _group_name(["日本-1", "日本-2"], set()) == "image-1"
    assert _group_name(["é-web-1", "é-web-2"], set()) == "web"
    assert len(_group_name(["a" * 100 + "1", "a" * 100 + "2"], set())) == 64
