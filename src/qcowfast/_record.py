"""Frozen records: the value classes a frozen dataclass gives, without importing `dataclasses`.

`dataclasses` imports `inspect` (and with it ast, dis, tokenize): 12 ms of every command's
start-up, more than all of qcowfast's own modules. A `@record` class has what
`@dataclass(frozen=True)` generates: an `__init__` taking the fields in order, by position or
keyword, with defaults; `repr`, `==`, `hash` and `__match_args__` over the fields; assignment
refused. Instances stay dataclass instances to `dataclasses.is_dataclass`, `fields`, `asdict`,
`astuple` and `replace`: the first look at `__dataclass_fields__` imports `dataclasses` then and
builds the fields of the equivalent dataclass.
"""
from __future__ import annotations

_MISSING = object()


class _Field:
    __slots__ = ("default", "default_factory", "repr")

    def __init__(self, default, default_factory, repr):
        self.default, self.default_factory, self.repr = default, default_factory, repr


def field(*, default=_MISSING, default_factory=_MISSING, repr: bool = True):
    """A field's default (a value, or a factory called per instance) and whether repr shows it."""
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return _Field(default, default_factory, repr)


class _DataclassFields:
    """`__dataclass_fields__`, computed on first use from an equivalent frozen dataclass."""

    def __get__(self, instance, owner):
        import dataclasses
        specs = []
        for name, (spec, _) in owner._record_fields.items():
            kwargs = {"repr": spec.repr}
            if spec.default is not _MISSING:
                kwargs["default"] = spec.default
            if spec.default_factory is not _MISSING:
                kwargs["default_factory"] = spec.default_factory
            specs.append((name, owner.__annotations__[name], dataclasses.field(**kwargs)))
        twin = dataclasses.make_dataclass(owner.__name__, specs, frozen=True)
        fields = twin.__dataclass_fields__
        type.__setattr__(owner, "__dataclass_fields__", fields)
        type.__setattr__(owner, "__dataclass_params__", twin.__dataclass_params__)
        return fields


def _frozen(self, name, value=None):
    from dataclasses import FrozenInstanceError     # (an AttributeError, as a frozen dataclass's)
    raise FrozenInstanceError(f"cannot assign to field {name!r} of a frozen "
                              f"{type(self).__name__}")


def record(cls):
    """Make `cls` a frozen record of its annotated fields (see the module docstring)."""
    fields = {}
    for name in getattr(cls, "__annotations__", {}):    # this class's own (Python >= 3.10)
        spec = cls.__dict__.get(name, _MISSING)
        if not isinstance(spec, _Field):
            spec = _Field(spec, _MISSING, True)
        has_default = spec.default is not _MISSING or spec.default_factory is not _MISSING
        if not has_default and any(d for _, d in fields.values()):
            raise TypeError(f"non-default field {name!r} follows a default field")
        fields[name] = (spec, has_default)
        if name in cls.__dict__:
            delattr(cls, name)
    names = tuple(fields)
    env = {"_MISSING": _MISSING}
    params, body = [], []
    for name, (spec, has_default) in fields.items():
        if spec.default_factory is not _MISSING:
            env[f"_f_{name}"] = spec.default_factory
            params.append(f"{name}=_MISSING")
            body.append(f"    d[{name!r}] = _f_{name}() if {name} is _MISSING else {name}")
        else:
            if has_default:
                env[f"_d_{name}"] = spec.default
                params.append(f"{name}=_d_{name}")
            else:
                params.append(name)
            body.append(f"    d[{name!r}] = {name}")
    source = (f"def __init__(self, {', '.join(params)}):\n    d = self.__dict__\n"
              + "\n".join(body or ["    pass"]) + "\n")
    exec(source, env)
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    shown = tuple(n for n, (spec, _) in fields.items() if spec.repr)

    def values(self):
        d = self.__dict__
        return tuple(d[n] for n in names)

    def __repr__(self):
        d = self.__dict__
        return f"{type(self).__qualname__}({', '.join(f'{n}={d[n]!r}' for n in shown)})"

    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    def __hash__(self):
        return hash(values(self))

    def replace(self, **changes):
        """A copy with the given fields changed."""
        return type(self)(**dict(zip(names, values(self)), **changes))

    cls._record_fields = fields
    cls.__init__ = init
    cls.__repr__ = __repr__
    cls.__eq__ = __eq__
    cls.__hash__ = __hash__
    cls.__setattr__ = _frozen
    cls.__delattr__ = _frozen
    cls.__match_args__ = names
    cls.__dataclass_fields__ = _DataclassFields()
    if "replace" not in cls.__dict__:
        cls.replace = replace
    cls.__replace__ = cls.__dict__["replace"]       # copy.replace() (Python 3.13)
    return cls
