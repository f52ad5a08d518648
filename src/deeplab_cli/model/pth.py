"""Read PyTorch .pth state_dicts as numpy arrays without running their pickle.

A .pth is a pickle, and unpickling calls whatever the file names: torch.load without weights_only, or
pickle.load, runs its author's code. Weight files are data, so here the pickle goes through an unpickler
that knows only the few globals a state_dict uses, each mapped to a function of ours that records a
tensor's layout, and refuses any other global before anything is called. Both containers are read: the
legacy stream of torch <= 1.5 (pickles, then raw storages) and the zip archive of torch >= 1.6. torch is
never imported.
"""

from __future__ import annotations

import copyreg
import io
import math
import os
import pickle
import pickletools
import zipfile
import zlib
from typing import Any, Callable, NamedTuple

import numpy as np

from deeplab_cli.errors import WeightsError

MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER: the legacy stream's first pickle
LEGACY_PROTOCOL = 1001
_MAGIC_LONG1 = b"\x8a\x0a" + MAGIC.to_bytes(10, "little")
# torch.<X>Storage -> the dtype read; bfloat16 and bool are decoded from uint16 / uint8 bytes.
_STORAGE_DTYPES = {"Float": "float32", "Double": "float64", "Half": "float16", "BFloat16": "bfloat16",
                   "Byte": "uint8", "Char": "int8", "Short": "int16", "Int": "int32", "Long": "int64",
                   "Bool": "bool"}
_RAW = {"bfloat16": "u2", "bool": "u1"}
_MAX_EXPANSION = 1 << 30  # bytes a stride-0 view may spread its storage to; beyond that it is refused


class _Bad(Exception):
    """Why the file is refused; read_pth puts the path in front."""


class _Global(NamedTuple):
    """An allowlisted global. A NamedTuple has no __dict__ and read-only fields, so a BUILD in a hostile
    pickle cannot rewrite it for later loads."""

    name: str
    fn: Callable[..., Any] | None = None
    dtype: str | None = None  # the storage classes: markers, never called

    def __call__(self, *args):
        if self.fn is None:
            raise _Bad(f"its pickle calls {self.name}, which a state_dict never calls")
        return self.fn(*args)


class _Storage(NamedTuple):
    key: str
    dtype: str
    start: int  # elements into the stored bytes: legacy storage views start inside their root
    numel: int


class _Tensor(NamedTuple):
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    negative: bool  # torch's neg bit: the values are the negated storage


class _Ordered(dict):
    """What collections.OrderedDict builds: a plain dict that can take the `_metadata` a state_dict carries."""


def _rebuild(storage, offset, size, stride, metadata=None) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _Bad("a tensor's storage is not a storage record")
    for what, values in (("offset", (offset,)), ("size", size), ("stride", stride)):
        if not isinstance(values, tuple) or not all(type(v) is int and v >= 0 for v in values):
            raise _Bad(f"a tensor's {what} is not non-negative integers: {_show(values)}")
    if len(size) != len(stride) or len(size) > 32:
        raise _Bad(f"a tensor has size {_show(size)} but stride {_show(stride)}")
    flags = dict(metadata or {})
    if set(flags) - {"neg", "conj"}:  # conj is meaningless for the real dtypes read here
        raise _Bad(f"a tensor carries metadata {_show(sorted(flags))}, which is not read here")
    return _Tensor(storage, offset, size, stride, bool(flags.get("neg")))


def _rebuild_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _rebuild(storage, offset, size, stride, metadata)


def _rebuild_v1(storage, offset, size, stride):
    return _rebuild(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data  # a Parameter is its tensor; autograd flags mean nothing to numpy


def _allowlist() -> dict[tuple[str, str], _Global]:
    calls = {("collections", "OrderedDict"): _Ordered, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
             ("torch._utils", "_rebuild_tensor"): _rebuild_v1,
             ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}
    allowed = {key: _Global(".".join(key), fn) for key, fn in calls.items()}
    for module in ("torch", "torch.cuda"):  # torch < 1.0 pickled a CUDA tensor's storage class as torch.cuda.*
        for kind, dtype in _STORAGE_DTYPES.items():
            allowed[(module, kind + "Storage")] = _Global(f"{module}.{kind}Storage", dtype=dtype)
    for module in ("torch", "torch.storage"):
        allowed[(module, "UntypedStorage")] = _Global(f"{module}.UntypedStorage", dtype="uint8")
    return allowed


_ALLOWED = _allowlist()


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)  # repr escapes newlines: every message stays one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refusal(module: Any, name: Any) -> str:
    full = f"{module}.{name}"
    full = full if full.isprintable() and len(full) <= 120 else _show(full, 120)
    if full.startswith(("torch.nn.modules.", "torch.nn.parallel.")):
        return f"refused: it is a whole pickled model ({full}), not a state_dict: save model.state_dict()"
    return f"refused: its pickle calls {full}, which a state_dict never needs (a .pth is only read as data here)"


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage: Callable[[Any], _Storage]):
        super().__init__(io.BytesIO(data), encoding="utf-8")  # utf-8: Python 2 str, as torch.load reads it
        self._storage = storage

    def find_class(self, module, name):
        # GLOBAL, STACK_GLOBAL, INST and EXT resolve here; OBJ, NEWOBJ and REDUCE only call what did.
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Bad(_refusal(module, name))
        return found

    def persistent_load(self, pid):
        return self._storage(pid)


def _scan(data: bytes, start: int) -> int:
    """Walk one pickle's opcodes without running them; return where it ends. EXT opcodes are refused here,
    not in find_class: an extension code this process has met before comes from copyreg's cache unasked."""
    stream = io.BytesIO(data)
    stream.seek(start)
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name.startswith("EXT"):
                if arg in copyreg._inverted_registry:
                    raise _Bad(_refusal(*copyreg._inverted_registry[arg]))
                raise _Bad(f"refused: its pickle uses extension code {arg}, which a state_dict never needs")
    except _Bad:
        raise
    except Exception as e:  # genops' ValueError for a truncated or foreign stream, and its kin
        raise _Bad(f"truncated or not a pickle at byte {start} ({_show(str(e))})") from None
    return stream.tell()


def _load(data: bytes, start: int, storage: Callable[[Any], _Storage]) -> tuple[Any, int]:
    """Unpickle the pickle at `start`; return it and where the next begins."""
    end = _scan(data, start)
    try:
        return _Unpickler(data[start:end], storage).load(), end
    except _Bad:
        raise
    except Exception as e:  # a malformed pickle: wrong arity, unhashable keys, ...
        raise _Bad(f"malformed pickle ({type(e).__name__}: {_show(str(e))})") from None


def _no_storage(pid) -> _Storage:
    raise _Bad(f"unexpected persistent id {_show(pid)} outside the main pickle")


def _text(value: Any) -> Any:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _storage_record(pid: Any, fields: int, seen: dict[str, _Storage]) -> _Storage:
    """A storage's persistent id: ('storage', class, key, location, numel[, view]). The location
    ('cpu', 'cuda:0') is ignored: the bytes are the same wherever the tensor lived."""
    kind = _text(pid[0]) if isinstance(pid, tuple) and pid else None
    if kind == "module":  # the legacy format's record of an nn.Module class: torch.save(model)
        raise _Bad("refused: it is a whole pickled model, not a state_dict: save model.state_dict()")
    if kind != "storage" or len(pid) != fields:
        raise _Bad(f"unknown persistent id {_show(pid)}")
    stype, key, _location, numel = pid[1:5]
    if not isinstance(stype, _Global) or stype.dtype is None:
        raise _Bad(f"storage class {_show(stype)} is not a storage")
    key = _text(key)
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise _Bad(f"malformed storage record {_show(pid)}")
    root = seen.setdefault(key, _Storage(key, stype.dtype, 0, numel))
    if root != (key, stype.dtype, 0, numel):
        raise _Bad(f"storage {key} is recorded as both {root.dtype}[{root.numel}] and {stype.dtype}[{numel}]")
    view = pid[5] if fields == 6 else None
    if view is None:
        return root
    if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])
            and view[1] + view[2] <= numel):
        raise _Bad(f"storage view {_show(view)} does not fit storage {key} of {numel} elements")
    return _Storage(key, root.dtype, view[1], view[2])


def _itemsize(dtype: str) -> int:
    return np.dtype(_RAW.get(dtype, dtype)).itemsize


def _read_legacy(data: bytes):
    """torch <= 1.5: pickles of the magic number, the protocol, sys_info, the object, its storage keys;
    then each storage as an int64 element count and its bytes."""
    magic, pos = _load(data, 0, _no_storage)
    protocol, pos = _load(data, pos, _no_storage)
    if magic != MAGIC or protocol != LEGACY_PROTOCOL:
        raise _Bad(f"not a torch.save stream (magic {_show(magic)}, protocol {_show(protocol)})")
    sys_info, pos = _load(data, pos, _no_storage)
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    seen: dict[str, _Storage] = {}
    obj, pos = _load(data, pos, lambda pid: _storage_record(pid, 6, seen))
    keys, pos = _load(data, pos, _no_storage)
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise _Bad(f"malformed storage key list {_show(keys)}")
    stored = {}
    for key in keys:
        if key not in seen:
            raise _Bad(f"storage {key} is stored but no tensor uses it")
        expected, head = seen[key].numel, data[pos : pos + 8]
        count = int.from_bytes(head, "little")
        # torch writes the count and the data little-endian on any machine (serialization.cpp), though
        # some old big-endian builds wrote the count in native order: sys_info tells which to try.
        if count != expected and big_endian and int.from_bytes(head, "big") == expected:
            count = expected
        if len(head) < 8 or count != expected:
            raise _Bad(f"truncated or damaged at storage {key}: expected {expected} elements at byte {pos}")
        nbytes = count * _itemsize(seen[key].dtype)
        if pos + 8 + nbytes > len(data):
            raise _Bad(f"truncated: storage {key} needs {nbytes} bytes at byte {pos + 8}, {len(data) - pos - 8} remain")
        stored[key] = memoryview(data)[pos + 8 : pos + 8 + nbytes]
        pos += 8 + nbytes
    return obj, lambda key: (stored[key], "<") if key in stored else _missing(key)


def _missing(key: str):
    raise _Bad(f"storage {key} is missing from the file")


def _read_zip(archive: zipfile.ZipFile):
    """torch >= 1.6: <prefix>/data.pkl, each storage in <prefix>/data/<key>, <prefix>/byteorder."""
    names = set(archive.namelist())
    pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Bad("a zip archive, but not one torch.save wrote (no single <dir>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    if any(name.startswith(prefix + "code/") for name in names):
        raise _Bad("a TorchScript archive (torch.jit.save), not a state_dict")
    order = archive.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
    if order not in (b"little", b"big"):
        raise _Bad(f"unknown byte order {_show(order)}")
    seen: dict[str, _Storage] = {}
    obj, _ = _load(archive.read(pickles[0]), 0, lambda pid: _storage_record(pid, 5, seen))

    def fetch(key: str):
        name, nbytes = f"{prefix}data/{key}", seen[key].numel * _itemsize(seen[key].dtype)
        if name not in names:
            _missing(key)
        if archive.getinfo(name).file_size != nbytes:  # checked before reading: a record is never over-read
            raise _Bad(f"storage {key} holds {archive.getinfo(name).file_size} bytes, its tensors say {nbytes}")
        return archive.read(name), "<" if order == b"little" else ">"

    return obj, fetch


def _state_dict(obj: Any) -> dict[str, _Tensor]:
    """The tensors by name: `obj` itself, or a training checkpoint's 'state_dict' or 'model'."""
    if not isinstance(obj, dict):
        kind = "single tensor" if isinstance(obj, _Tensor) else type(obj).__name__
        raise _Bad(f"holds a {kind}, not a state_dict (tensors by name)")
    if not any(isinstance(value, _Tensor) for value in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return _state_dict(obj[key])
    tensors = {}
    for key, value in obj.items():
        if isinstance(value, _Tensor):  # other values (ints, nested dicts) are dropped
            if not isinstance(key, str):
                raise _Bad(f"a tensor is stored under {_show(key)}, not under a name")
            tensors[key] = value
    if not tensors:
        raise _Bad(f"holds no tensors by name (a dict of {_show(sorted(map(str, obj))[:8])})")
    return tensors


def _array(tensor: _Tensor, raw, order: str) -> np.ndarray:
    """A C-contiguous copy of the tensor, after checking that its view lies inside its storage."""
    st, itemsize = tensor.storage, _itemsize(tensor.storage.dtype)
    dtype = np.dtype(_RAW.get(st.dtype, st.dtype)).newbyteorder(order)
    if len(raw) < (st.start + st.numel) * itemsize:
        raise _Bad(f"storage {st.key} holds {len(raw)} bytes, its tensors need {(st.start + st.numel) * itemsize}")
    numel = math.prod(tensor.size)
    if numel == 0:
        out = np.zeros(tensor.size, dtype.newbyteorder("="))
    else:
        last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
        if last >= st.numel:
            raise _Bad(f"a tensor of size {tensor.size} and stride {tensor.stride} at offset {tensor.offset} "
                       f"reaches element {last} of storage {st.key}, which has {st.numel}")
        if numel > st.numel and numel * itemsize > _MAX_EXPANSION:
            raise _Bad(f"a tensor of size {tensor.size} repeats its storage {st.key} beyond {_MAX_EXPANSION} bytes")
        flat = np.frombuffer(raw, dtype, count=st.numel, offset=st.start * itemsize)
        view = np.lib.stride_tricks.as_strided(flat[tensor.offset :], tensor.size,
                                               [s * itemsize for s in tensor.stride], writeable=False)
        out = np.array(view, dtype=dtype.newbyteorder("="), order="C")  # a copy, in native byte order
    if st.dtype == "bfloat16":  # the top half of a float32: shifting it up is exact
        out = (out.astype(np.uint32) << 16).view(np.float32)
    elif st.dtype == "bool":
        out = out != 0
    return np.negative(out) if tensor.negative and out.dtype != bool else out


def _arrays(obj: Any, fetch: Callable[[str], tuple[Any, str]]) -> dict[str, np.ndarray]:
    cache: dict[str, tuple[Any, str]] = {}
    result = {}
    for name, tensor in _state_dict(obj).items():
        key = tensor.storage.key
        if key not in cache:
            cache[key] = fetch(key)
        result[name] = _array(tensor, *cache[key])
    return result


def looks_like_legacy_pth(head: bytes) -> bool:
    """Whether `head` (a file's first 32 or more bytes) opens a legacy torch.save stream: a pickle of
    MAGIC (protocol 2 as torch wrote it; 3 to 5, framed, if asked for)."""
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    body = head[2:]
    if body[:1] == b"\x95":  # FRAME and its 8-byte length, from protocol 4 on
        body = body[9:]
    return body.startswith(_MAGIC_LONG1)


def is_torch_zip(path: str | os.PathLike) -> bool:
    """Whether `path` is a zip holding a `<dir>/data.pkl`, as torch.save (>= 1.6) writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.count("/") == 1 and name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def is_pth(path: str | os.PathLike) -> bool:
    """Whether `path` is a .pth by content, in either format."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return False
    return looks_like_legacy_pth(head) or (head.startswith(b"PK") and is_torch_zip(path))


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict's tensors by key, as numpy arrays. Raises WeightsError, one line naming `path`."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            if looks_like_legacy_pth(head):
                f.seek(0)
                return _arrays(*_read_legacy(f.read()))
        if head.startswith(b"PK"):
            with zipfile.ZipFile(path) as archive:
                return _arrays(*_read_zip(archive))
        if head[257:262] == b"ustar":
            raise _Bad("a tar-format .pth from torch < 0.4, which is not read here: re-save it with a newer torch")
        raise _Bad("not a PyTorch .pth (neither a torch.save zip archive nor a legacy torch.save stream)")
    except _Bad as e:
        raise WeightsError(f"{path}: {e}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise WeightsError(f"{path}: damaged zip archive ({_show(str(e))})") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # anything else a hostile file provokes is still one line naming the file
        raise WeightsError(f"{path}: unreadable .pth ({type(e).__name__}: {_show(str(e))})") from None
