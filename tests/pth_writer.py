"""An independent torch.save writer for tests: the "tool that is not ours" for .pth files.

It emits pickle opcodes by hand (protocol 2, opcodes as documented in pickletools) because Python's
pickler cannot name torch._utils._rebuild_tensor_v2 without torch, and lays the pickles and raw storages
out in torch's two containers as torch/serialization.py writes them. It uses neither torch nor
deeplab_cli.model.pth, so a round trip checks the reader against a second reading of the format.
"""

from __future__ import annotations

import shlex
import struct
import zipfile
from typing import Any, NamedTuple

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
EXT_CODE = 241  # copyreg reserves 240-255 for private use; tests register os.system under it
STORAGE_CLASSES = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
                   "bfloat16": "BFloat16Storage", "uint8": "ByteStorage", "int8": "CharStorage",
                   "int16": "ShortStorage", "int32": "IntStorage", "int64": "LongStorage", "bool": "BoolStorage"}


# Values the emitter understands besides None, bools, ints, floats, str, tuples, lists and dicts.
class G(NamedTuple):  # a global by GLOBAL
    module: str
    name: str


class StackGlobal(NamedTuple):  # a global by STACK_GLOBAL
    module: str
    name: str


class Ext(NamedTuple):  # a global by EXT1 (copyreg's extension registry)
    code: int


class Call(NamedTuple):  # fn(*args) by REDUCE
    fn: Any
    args: tuple


class Inst(NamedTuple):  # module.name(*args) by INST
    module: str
    name: str
    args: tuple


class Obj(NamedTuple):  # cls(*args) by OBJ
    cls: Any
    args: tuple


class Build(NamedTuple):  # obj, then BUILD with state
    obj: Any
    state: Any


class PersId(NamedTuple):  # a persistent id by BINPERSID
    pid: tuple


class Ordered(NamedTuple):  # collections.OrderedDict(items), then BUILD with `state` as a state_dict has
    items: list
    state: dict | None = None


class BFloat16:
    """A bfloat16 tensor: float32 values that bfloat16 holds exactly; `bits` are their top halves."""

    def __init__(self, values):
        values = np.ascontiguousarray(values, dtype=np.float32)
        if np.any(values.view(np.uint32) & 0xFFFF):
            raise ValueError("these values are not exact in bfloat16")
        self.values, self.bits = values, (values.view(np.uint32) >> 16).astype(np.uint16)
        self.shape, self.ndim = values.shape, values.ndim


class Emitter:
    def __init__(self):
        self.out = bytearray()

    def dump(self, value, protocol: int = 2) -> bytes:
        self.out = bytearray(b"\x80" + bytes([protocol]))  # PROTO
        self.emit(value)
        self.out += b"."  # STOP
        return bytes(self.out)

    def emit(self, v):  # noqa: C901 - one opcode family per kind of value
        out = self.out
        if v is None:
            out += b"N"
        elif v is True or v is False:
            out += b"\x88" if v else b"\x89"  # NEWTRUE / NEWFALSE
        elif isinstance(v, int):
            if -(2**31) <= v < 2**31:
                out += b"J" + struct.pack("<i", v)  # BININT
            else:
                body = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                out += b"\x8a" + bytes([len(body)]) + body  # LONG1
        elif isinstance(v, float):
            out += b"G" + struct.pack(">d", v)  # BINFLOAT
        elif isinstance(v, str):
            data = v.encode("utf-8")
            out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
        elif isinstance(v, G):
            out += b"c" + f"{v.module}\n{v.name}\n".encode()  # GLOBAL
        elif isinstance(v, StackGlobal):
            self.emit(v.module), self.emit(v.name)
            out += b"\x93"  # STACK_GLOBAL
        elif isinstance(v, Ext):
            out += b"\x82" + bytes([v.code])  # EXT1
        elif isinstance(v, Call):
            self.emit(v.fn), self.emit(tuple(v.args))
            out += b"R"  # REDUCE
        elif isinstance(v, Inst):
            out += b"("
            for arg in v.args:
                self.emit(arg)
            out += b"i" + f"{v.module}\n{v.name}\n".encode()  # INST
        elif isinstance(v, Obj):
            out += b"("
            for item in (v.cls, *v.args):
                self.emit(item)
            out += b"o"  # OBJ
        elif isinstance(v, Build):
            self.emit(v.obj), self.emit(v.state)
            out += b"b"  # BUILD
        elif isinstance(v, PersId):
            self.emit(tuple(v.pid))
            out += b"Q"  # BINPERSID
        elif isinstance(v, Ordered):
            self.emit(Call(G("collections", "OrderedDict"), ()))
            self._items(v.items)
            if v.state is not None:
                self.emit(v.state)
                out += b"b"  # BUILD
        elif isinstance(v, tuple):
            out += b")" if not v else b"("
            for item in v:
                self.emit(item)
            out += b"t" if v else b""  # MARK ... TUPLE
        elif isinstance(v, list):
            out += b"]("  # EMPTY_LIST MARK
            for item in v:
                self.emit(item)
            out += b"e"  # APPENDS
        elif isinstance(v, dict):
            out += b"}"  # EMPTY_DICT
            self._items(list(v.items()))
        else:
            raise TypeError(f"cannot emit {type(v).__name__}")

    def _items(self, items):
        self.out += b"("  # MARK
        for key, value in items:
            self.emit(key), self.emit(value)
        self.out += b"u"  # SETITEMS


def dumps(value, protocol: int = 2) -> bytes:
    return Emitter().dump(value, protocol)


class View(NamedTuple):
    """A tensor as torch records it: a view of a storage."""

    storage: str
    offset: int
    size: tuple
    stride: tuple


def _c_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _layout(state: dict, offsets: bool):
    """Lay every array of `state` (nested dicts too) into storages: {key: (dtype, flat elements)} and
    the same nesting with View in place of arrays. With `offsets`, arrays of one dtype share a storage,
    each after three filler elements, and arrays of two or more dimensions are stored transposed."""
    storages: dict[str, tuple[str, list]] = {}

    def place(value):
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        if not isinstance(value, (np.ndarray, BFloat16)):
            return value
        flat_source = value.bits if isinstance(value, BFloat16) else value
        dtype = "bfloat16" if isinstance(value, BFloat16) else value.dtype.name
        if offsets:
            key = next((k for k, (d, _) in storages.items() if d == dtype), str(len(storages)))
            chunks = storages.setdefault(key, (dtype, []))[1]
            start = sum(c.size for c in chunks) + 3
            chunks.append(np.zeros(3, flat_source.dtype))
            order = "F" if value.ndim >= 2 else "C"
            stride = tuple(reversed(_c_strides(value.shape[::-1]))) if order == "F" else _c_strides(value.shape)
            chunks.append(np.ravel(flat_source, order=order))
            return View(key, start, tuple(value.shape), stride)
        key = str(len(storages))
        storages[key] = (dtype, [np.ravel(flat_source)])
        return View(key, 0, tuple(value.shape), _c_strides(value.shape))

    placed = place(state)
    return {k: (d, np.concatenate(c) if c else np.zeros(0)) for k, (d, c) in storages.items()}, placed


def state_pickle(placed, storages: dict, *, legacy: bool, location: str = "cpu", names: dict | None = None):
    """The main pickle of `placed` (the nesting _layout returns), storages named by `names` (their keys by
    default). A dict holding tensors is an OrderedDict with state_dict's `_metadata`, as torch writes it."""
    names = names or {key: key for key in storages}

    def value(v):
        if isinstance(v, dict):
            items = [(k, value(x)) for k, x in v.items()]
            if any(isinstance(x, View) for x in v.values()):
                return Ordered(items, {"_metadata": Ordered([("", {"version": 1})])})
            return dict(items)
        if not isinstance(v, View):
            return v
        dtype, flat = storages[v.storage]
        pid = ("storage", G("torch", STORAGE_CLASSES[dtype]), names[v.storage], location, int(flat.size))
        args = (PersId(pid + (None,) if legacy else pid), v.offset, v.size, v.stride, False, Ordered([]))
        return Call(G("torch._utils", "_rebuild_tensor_v2"), args)

    return dumps(value(placed))


def _raw(dtype: str, flat: np.ndarray, big_endian: bool) -> bytes:
    raw = flat.astype(np.uint8) if dtype == "bool" else flat
    return raw.astype(raw.dtype.newbyteorder(">" if big_endian else "<")).tobytes()


def legacy_bytes(main: bytes, storages: dict[str, tuple[int, bytes]], *, big_endian=False,
                 count_big_endian=False) -> bytes:
    """torch <= 1.5's stream: the magic number, protocol version and sys_info pickles, `main`, the sorted
    storage keys, then each storage as an int64 count and its bytes. Storage bytes are little-endian even
    from a big-endian machine (torch converts them); `count_big_endian` imitates old builds that wrote
    the count in native order."""
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": not big_endian,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    out = bytearray(dumps(MAGIC_NUMBER) + dumps(PROTOCOL_VERSION) + dumps(sys_info) + main)
    keys = sorted(storages)
    out += dumps(keys)
    for key in keys:
        count, data = storages[key]
        out += count.to_bytes(8, "big" if count_big_endian else "little") + data
    return bytes(out)


def write_zip(path, data_pkl: bytes, records: dict[str, bytes], *, prefix="archive", byteorder="little"):
    """torch >= 1.6's archive, records stored uncompressed in torch's order, each storage's bytes
    aligned to 64 as torch's writer pads them. byteorder=None leaves the record out, as old torch did."""
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        def put(name: str, data: bytes, align: bool = False):
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            if align:  # an extra field pads the local header so the data starts at a multiple of 64
                pad = -(f.tell() + 30 + len(info.filename.encode()) + 4) % 64
                info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            archive.writestr(info, data)

        put("data.pkl", data_pkl)
        put(".format_version", b"1")
        put(".storage_alignment", b"64")
        if byteorder is not None:
            put("byteorder", byteorder.encode())
        for key, data in records.items():
            put(f"data/{key}", data, align=True)
        put("version", b"3\n")
        put(".data/serialization_id", b"0123456789012345678901234567890123456789")


def write_pth(path, state: dict, *, zip_format: bool, prefix: str = "archive", location: str = "cpu",
              big_endian: bool = False, offsets: bool = False, count_big_endian: bool = False) -> None:
    """Write `state` (name -> numpy array or BFloat16; nested dicts and plain values allowed) as torch.save
    writes it, in the zip format or the legacy one."""
    storages, placed = _layout(state, offsets)
    if zip_format:
        data = state_pickle(placed, storages, legacy=False, location=location)
        records = {key: _raw(d, flat, big_endian) for key, (d, flat) in storages.items()}
        write_zip(path, data, records, prefix=prefix, byteorder="big" if big_endian else "little")
        return
    names = {key: str(94_000_000_000_000 + 64 * int(key)) for key in storages}  # like str(storage._cdata)
    main = state_pickle(placed, storages, legacy=True, location=location, names=names)
    raw = {names[key]: (int(flat.size), _raw(d, flat, False)) for key, (d, flat) in storages.items()}
    with open(path, "wb") as f:
        f.write(legacy_bytes(main, raw, big_endian=big_endian, count_big_endian=count_big_endian))


# Pickles that run code when unpickled, each creating `marker`. The global each names first is in REFUSED.
REFUSED = {"reduce": "os.system", "exec": "builtins.exec", "posix": "posix.system",
           "subprocess": "subprocess.Popen", "stack_global": "os.system", "inst": "os.system", "obj": "os.system",
           "ext": "os.system", "getattr": "builtins.getattr", "dotted": "zipfile.os.system", "nested": "os.system"}


def malicious_pickle(kind: str, marker) -> bytes:
    marker = str(marker)
    shell = f"touch {shlex.quote(marker)}"
    if kind == "nested":  # a valid-looking state_dict whose tensor hides a call in its arguments
        args = (Call(G("os", "system"), (shell,)), 0, (1,), (1,), False, Ordered([]))
        return dumps(Ordered([("w", Call(G("torch._utils", "_rebuild_tensor_v2"), args))]))
    if kind == "dotted":  # protocol 4 lets find_class walk attributes: zipfile.os is the os module
        return dumps(Call(StackGlobal("zipfile", "os.system"), (shell,)), protocol=4)
    value = {
        "reduce": Call(G("os", "system"), (shell,)),
        "exec": Call(G("builtins", "exec"), (f"open({marker!r}, 'w').close()",)),
        "posix": Call(G("posix", "system"), (shell,)),
        "subprocess": Call(G("subprocess", "Popen"), (["touch", marker],)),
        "stack_global": Call(StackGlobal("os", "system"), (shell,)),
        "inst": Inst("os", "system", (shell,)),
        "obj": Obj(G("os", "system"), (shell,)),
        "ext": Call(Ext(EXT_CODE), (shell,)),
        "getattr": Call(Call(G("builtins", "getattr"), (Call(G("builtins", "__import__"), ("os",)), "system")),
                        (shell,)),
    }[kind]
    return dumps(value)
