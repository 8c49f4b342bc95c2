"""A light `@dataclass` and a light `Enum` for the modules on the hook's path.

The hook runs on every VM start. The standard `dataclasses` module imports `inspect`, which
costs about 10 ms here, a third of the hook's budget. Modules on that path (errors, policy,
decide, host, notify, libvirt_xml) use this decorator instead; it is declared with PEP 681's
`dataclass_transform`, so mypy checks their classes as dataclasses. It supports what they use:
keyword or positional construction, defaults, `default_factory`, `frozen`, `eq`, `hash=False`
fields and a dataclass-style repr, and `replace` (a copy with some fields changed). No
inheritance, no `__post_init__`, no `asdict` (those modules don't need them).

`Choice` stands in for `enum.Enum` in the same way (importing enum costs 1.5-3.5 ms here): the
policy model declares `class Action(Choice)` at run time and `class Action(enum.Enum)` for mypy.
It supports what the model uses: members as class attributes with `.name` and `.value`,
`Action("merge")` (ValueError for anything else), iteration in declaration order, identity.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:

    def dataclass_transform(**_kwargs: object) -> Callable[[T], T]:
        return lambda decorated: decorated


_MISSING: Any = object()


class FrozenInstanceError(AttributeError):
    pass


class Field:
    __slots__ = ("compare", "default", "default_factory", "hash")

    def __init__(self, default: Any, default_factory: Any, compare: bool, hash: bool) -> None:
        self.default = default
        self.default_factory = default_factory
        self.compare = compare
        self.hash = hash


def field(
    *,
    default: Any = _MISSING,
    default_factory: Callable[[], Any] = _MISSING,
    compare: bool = True,
    hash: bool = True,
) -> Any:
    return Field(default, default_factory, compare, hash)


@dataclass_transform(field_specifiers=(field,))
def dataclass(cls: type[T] | None = None, /, *, frozen: bool = False, eq: bool = True) -> Any:
    def wrap(klass: type[T]) -> type[T]:
        return _build(klass, frozen=frozen, eq=eq)

    return wrap if cls is None else wrap(cls)


def replace(record: T, **changes: Any) -> T:
    """A copy of a record with some fields changed, as `dataclasses.replace` makes one."""
    names = type(record).__match_args__  # type: ignore[attr-defined]
    unknown = set(changes) - set(names)
    if unknown:
        raise TypeError(f"{type(record).__name__} has no field {', '.join(sorted(unknown))}")
    return type(record)(**{n: changes[n] if n in changes else getattr(record, n) for n in names})


def _build(cls: type[T], *, frozen: bool, eq: bool) -> type[T]:
    annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 - no inspect here
    names = [n for n in annotations if not n.startswith("_")]
    init, hashed, compared = _init(cls, names, frozen=frozen)
    _set(cls, "__init__", init)
    _set(cls, "__match_args__", tuple(names))

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{type(self).__qualname__}({inner})"

    _set(cls, "__repr__", __repr__)
    if eq:
        _add_eq(cls, compared, hashed, frozen=frozen)
    if frozen:
        _add_frozen(cls)
    return cls


def _init(cls: type, names: list[str], *, frozen: bool) -> tuple[Any, list[str], list[str]]:
    """The generated __init__, and the fields that hash and compare."""
    namespace: dict[str, Any] = {"_MISSING": _MISSING, "_setattr": object.__setattr__}
    params: list[str] = []
    body: list[str] = []
    hashed: list[str] = []
    compared: list[str] = []
    for name in names:
        spec = cls.__dict__.get(name, _MISSING)
        if isinstance(spec, Field):
            default, factory = spec.default, spec.default_factory
            hashed += [name] if spec.hash else []
            compared += [name] if spec.compare else []
        else:
            default, factory = spec, _MISSING
            hashed.append(name)
            compared.append(name)
        param = _param(name, default, factory, namespace)
        if params and "=" in params[-1] and "=" not in param:
            raise TypeError(f"{cls.__name__}: non-default field {name} after a default one")
        params.append(param)
        value = f"_factory_{name}() if {name} is _MISSING else {name}"
        value = value if factory is not _MISSING else name
        body.append(
            f"    _setattr(self, {name!r}, {value})" if frozen else f"    self.{name} = {value}"
        )
        if name in cls.__dict__:
            delattr(cls, name)  # instances hold the value; the class keeps no stale default
    source = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "    pass")
    exec(source, namespace)
    return namespace["__init__"], hashed, compared


def _param(name: str, default: Any, factory: Any, namespace: dict[str, Any]) -> str:
    """One parameter of __init__, its default kept in `namespace`."""
    if factory is not _MISSING:
        namespace[f"_factory_{name}"] = factory
        return f"{name}=_MISSING"
    if default is not _MISSING:
        namespace[f"_default_{name}"] = default
        return f"{name}=_default_{name}"
    return name


def _add_eq(cls: type, compared: list[str], hashed: list[str], *, frozen: bool) -> None:
    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in compared)

    _set(cls, "__eq__", __eq__)
    if frozen:

        def __hash__(self: Any) -> int:
            return hash(tuple(getattr(self, n) for n in hashed))

        _set(cls, "__hash__", __hash__)
    else:
        _set(cls, "__hash__", None)


def _add_frozen(cls: type) -> None:
    def __setattr__(self: Any, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self: Any, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    _set(cls, "__setattr__", __setattr__)
    _set(cls, "__delattr__", __delattr__)


def _set(cls: type, name: str, value: object) -> None:
    setattr(cls, name, value)


class _ChoiceType(type):
    """Makes each string class attribute of a `Choice` subclass a member object."""

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> Any:
        values = {
            key: value
            for key, value in namespace.items()
            if not key.startswith("_") and isinstance(value, str)
        }
        cls = super().__new__(mcs, name, bases, namespace)
        members = []
        for key, value in values.items():
            member: Any = object.__new__(cls)  # type: ignore[arg-type]
            object.__setattr__(member, "name", key)
            object.__setattr__(member, "value", value)
            type.__setattr__(cls, key, member)
            members.append(member)
        type.__setattr__(cls, "_members", tuple(members))
        type.__setattr__(cls, "_by_value", {m.value: m for m in members})
        return cls

    def __call__(cls, value: object) -> Any:
        try:
            return cls._by_value[value]  # type: ignore[attr-defined]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {cls.__name__}") from None

    def __iter__(cls) -> Any:
        return iter(cls._members)  # type: ignore[attr-defined]

    def __len__(cls) -> int:
        return len(cls._members)  # type: ignore[attr-defined]

    def __setattr__(cls, name: str, value: object) -> None:
        raise AttributeError(f"cannot reassign member {name!r}")


class Choice(metaclass=_ChoiceType):
    """A member of a light enum; see the module docstring."""

    __slots__ = ("name", "value")
    name: str
    value: str

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self.value!r}>"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} members cannot change")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.value,)
