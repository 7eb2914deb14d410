"""Frozen records (qcowfast._record) behave as the frozen dataclasses they replace, and plain
conversions and `info` import neither dataclasses nor typing (12 ms and 5 ms of start-up)."""
import copy
import dataclasses
import pickle

import pytest

import qcowfast
from qcowfast._record import field, record
from qcowfast.convert import ConvertResult
from qcowfast.header import Header

from common import modules_imported_after, qemu_img

# ...nor the kernels that only compressed sources and the numpy path need.
_NOT_LOADED = ["dataclasses", "inspect", "typing", "numpy", "qcowfast._inflate", "qcowfast._fill",
               "qcowfast._tables"]


def _pair():
    """The same class as a record and as a frozen dataclass, both named Point."""
    body = {"__annotations__": {"x": "int", "y": "int", "tag": "str", "extra": "dict",
                                "hidden": "tuple"},
            "tag": "p", "extra": None, "hidden": None}

    def make(decorate, fld):
        ns = dict(body, __annotations__=dict(body["__annotations__"]),
                  extra=fld(default_factory=dict), hidden=fld(default=(), repr=False))
        return decorate(type("Point", (), ns))
    return (make(record, field),
            make(dataclasses.dataclass(frozen=True), dataclasses.field))


def test_record_matches_a_frozen_dataclass():
    rec, dc = _pair()
    for args, kwargs in [((1, 2), {}), ((1,), {"y": 5, "tag": "q"}),
                         ((), {"x": 3, "y": 4, "extra": {"a": 1}, "hidden": (9,)})]:
        a, b = rec(*args, **kwargs), dc(*args, **kwargs)
        assert repr(a) == repr(b)
        assert dataclasses.astuple(a) == dataclasses.astuple(b)
        assert dataclasses.asdict(a) == dataclasses.asdict(b)
    assert rec(1, 2) == rec(1, 2) != rec(1, 3)
    assert rec(1, 2) != dc(1, 2)
    assert rec(1, 2, extra={}).extra is not rec(1, 2).extra      # a fresh default per instance
    assert hash(rec(1, 2, extra=None)) == hash(rec(1, 2, extra=None))
    with pytest.raises(TypeError):
        hash(rec(1, 2))                                         # a dict field, as a dataclass
    assert rec.__match_args__ == dc.__match_args__
    for bad in [(), (1, 2, "t", {}, (), 6)]:
        with pytest.raises(TypeError):
            rec(*bad)
        with pytest.raises(TypeError):
            dc(*bad)
    with pytest.raises(TypeError):
        rec(1, 2, nope=3)


def test_record_is_frozen_and_dataclass_compatible():
    rec, dc = _pair()
    p = rec(1, 2)
    for action in (lambda: setattr(p, "x", 5), lambda: delattr(p, "x"),
                   lambda: setattr(p, "new", 1)):
        with pytest.raises(AttributeError):
            action()
    assert p.x == 1
    assert dataclasses.is_dataclass(p) and dataclasses.is_dataclass(rec)
    assert ([(f.name, f.type, f.default, f.repr) for f in dataclasses.fields(p)]
            == [(f.name, f.type, f.default, f.repr) for f in dataclasses.fields(dc)])
    assert dataclasses.replace(p, y=7) == rec(1, 7) == p.replace(y=7) == p.__replace__(y=7)
    assert p == rec(1, 2)                                       # replace left p alone
    for clone in (copy.copy(p), copy.deepcopy(p)):
        assert clone == p and clone is not p


def test_record_refuses_a_required_field_after_a_default():
    with pytest.raises(TypeError):
        record(type("Bad", (), {"__annotations__": {"a": "int", "b": "int"}, "a": 1}))
    with pytest.raises(ValueError):
        field(default=1, default_factory=list)


def test_public_records_keep_their_dataclass_api(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    with qcowfast.open(img) as image:
        h = image.header
    assert isinstance(h, Header) and dataclasses.is_dataclass(h)
    assert dataclasses.asdict(h)["size"] == 1 << 20 == h.size
    bigger = dataclasses.replace(h, size=2 << 20)
    assert bigger.size == 2 << 20 and bigger.cluster_size == h.cluster_size == 65536
    assert h.replace(size=2 << 20) == bigger
    assert pickle.loads(pickle.dumps(h)) == h and copy.deepcopy(h) == h
    assert "feature_names" not in repr(h) and "size=1048576" in repr(h)
    result = qcowfast.convert(img, tmp_path / "a.raw")
    assert pickle.loads(pickle.dumps(result)) == result          # results cross processes (Dask)
    assert isinstance(result, ConvertResult) and result.virtual_size == 1 << 20
    with pytest.raises(AttributeError):
        result.seconds = 0


def test_plain_commands_import_only_what_they_need(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    for argv in (["convert", "-O", "raw", str(img), str(tmp_path / "a.raw")],
                 ["convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "a.raw"),
                  str(tmp_path / "b.qcow2")],
                 ["info", str(img)]):
        code = ("import sys\nfrom qcowfast.cli import main\n"
                f"sys.argv = ['qcowfast'] + {argv!r}\n"
                "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n")
        assert modules_imported_after(code, _NOT_LOADED) == set(), argv
    # The probe sees a module that is imported: check adds dataclasses (and numpy).
    code = f"import sys\nfrom qcowfast import check\ncheck({str(img)!r})\n"
    assert {"dataclasses", "numpy"} <= modules_imported_after(code, _NOT_LOADED)
