"""ksmpolicy.records behaves like the parts of dataclasses its users rely on."""

from __future__ import annotations

import dataclasses

import pytest

from ksmpolicy.records import FrozenInstanceError, dataclass, field, replace


@dataclass(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()
    extra: dict[str, int] = field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class Reference:  # the same fields with the standard library, for comparison
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()
    extra: dict[str, int] = dataclasses.field(default_factory=dict, hash=False)


def test_construction_defaults_and_factories() -> None:
    p = Point(1)
    assert (p.x, p.y, p.tags, p.extra) == (1, 0, (), {})
    assert Point(1).extra is not Point(1).extra  # a fresh dict each time
    assert Point(x=2, y=3) == Point(2, 3)
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]


def test_equality_hash_and_repr_match_dataclasses() -> None:
    assert Point(1, 2) != Point(1, 2, extra={"a": 1})  # compared, like dataclasses
    assert Reference(1, 2) != Reference(1, 2, extra={"a": 1})
    assert Point(1, 2) != Point(1, 3)
    assert hash(Point(1, 2, extra={"a": 1})) == hash(Point(1, 2))  # but not hashed
    assert hash(Reference(1, 2, extra={"a": 1})) == hash(Reference(1, 2))
    assert repr(Point(1, 2)) == repr(Reference(1, 2)).replace("Reference", "Point")
    other: object = (1, 0, (), {})
    assert Point(1) != other


def test_replace_matches_dataclasses_replace() -> None:
    p, r = Point(1, 2, ("a",), {"k": 1}), Reference(1, 2, ("a",), {"k": 1})
    changed = replace(p, y=5, tags=("b",))
    assert (changed.x, changed.y, changed.tags, changed.extra) == (1, 5, ("b",), {"k": 1})
    assert (
        repr(changed).split("(", 1)[1]
        == repr(dataclasses.replace(r, y=5, tags=("b",))).split("(", 1)[1]
    )
    assert p.y == 2  # the original is left as it was
    with pytest.raises(TypeError, match="Point has no field z"):
        replace(p, z=1)


def test_frozen() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del p.x


def test_mutable_records_are_unhashable() -> None:
    @dataclass
    class Box:
        value: int
        items: list[int] = field(default_factory=list)

    box = Box(1)
    box.value = 2
    box.items.append(3)
    assert box == Box(2, [3])
    with pytest.raises(TypeError):
        hash(box)


def test_non_default_after_default_is_refused() -> None:
    with pytest.raises(TypeError, match="non-default field b after a default one"):

        @dataclass
        class Bad:
            a: int = 1
            b: int  # type: ignore[misc]


def test_choice_behaves_like_the_enum_it_stands_in_for() -> None:
    import enum

    from ksmpolicy.policy.model import Action, Enforcement
    from ksmpolicy.records import Choice

    class Real(enum.Enum):
        MERGE = "merge"
        EXCLUDE = "exclude"

    assert [m.value for m in Action] == [m.value for m in Real]
    assert [m.name for m in Action] == [m.name for m in Real]
    assert Action("merge") is Action.MERGE and Action.MERGE.value == "merge"
    assert Action.EXCLUDE.name == "EXCLUDE" and len(Enforcement) == 3
    assert repr(Enforcement.BLOCK) == "<Enforcement.BLOCK: 'block'>"
    assert len({Action.MERGE, Action.EXCLUDE}) == 2 and {Action.MERGE: 1}[Action("merge")] == 1
    for bad in ("MERGE", "", None, ["merge"]):
        with pytest.raises(ValueError, match="is not a valid Action"):
            Action(bad)
    with pytest.raises(AttributeError):
        Action.MERGE.value = "exclude"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Action.MERGE = Action.EXCLUDE  # type: ignore[misc,assignment]
    assert isinstance(Action.MERGE, Choice) and not isinstance(Action.MERGE, enum.Enum)
