"""The .pth reader: round trips through an independent writer (tests/pth_writer.py), damaged and hostile
files, and cross-checks with torch itself (`pytest -m crosscheck`, skipped where torch is missing)."""

import copyreg
import importlib.util
import io
import os
import pickle
import posix
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
import pth_writer as W

from deeplab_cli.errors import WeightsError
from deeplab_cli.model import pth
from deeplab_cli.model.pth import is_pth, is_torch_zip, looks_like_legacy_pth, read_pth

FORMATS = [pytest.param(False, id="legacy"), pytest.param(True, id="zip")]


def sample_state():
    rng = np.random.default_rng(7)
    return {
        "module.features.0.weight": rng.standard_normal((4, 3, 3, 3), dtype=np.float32),
        "module.features.0.bias": rng.standard_normal(4, dtype=np.float32),
        "half": rng.standard_normal((3, 5)).astype(np.float16),
        "double": rng.standard_normal((2, 3, 2)),
        "bf16": W.BFloat16(np.array([[1.0, -2.5, 3.140625], [0.0, -0.0, 65280.0]], np.float32)),
        "long": np.arange(-3, 9, dtype=np.int64).reshape(3, 4),
        "num_batches_tracked": np.array(1234567890123, dtype=np.int64),  # a scalar, shape ()
        "scalar": np.array(0.25, dtype=np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "mask": np.array([[True, False], [False, True]]),
        "bytes": np.array([0, 7, 255], np.uint8),
        "chars": np.array([-128, 0, 127], np.int8),
        "shorts": np.array([-30000, 2, 30000], np.int16),
        "ints": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    }


def expected(value):
    return value.values if isinstance(value, W.BFloat16) else value


def assert_same(got: dict, state: dict):
    assert list(got) == [k for k, v in state.items() if isinstance(v, (np.ndarray, W.BFloat16))]
    for key, value in state.items():
        want = expected(value)
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert got[key].flags.c_contiguous, key
        assert got[key].tobytes() == np.ascontiguousarray(want).tobytes(), key  # bit-exact, -0.0 included


def refusal(path, *reads) -> str:
    """read_pth's one-line WeightsError message for `path`."""
    with pytest.raises(WeightsError) as caught:
        read_pth(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for text in reads:
        assert text in message, message
    return message


def write_views(path, storages: dict, placed: dict, zip_format: bool, drop: tuple = (), cut: dict | None = None):
    """A file of hand-made views: storages {key: (dtype, flat array)}, placed {name: W.View}. `drop` leaves
    storages out of the file; `cut` {key: bytes} stores fewer bytes than the pickle says."""
    cut = cut or {}
    main = W.state_pickle(placed, storages, legacy=not zip_format)
    raw = {k: W._raw(d, flat, False)[: cut.get(k)] for k, (d, flat) in storages.items() if k not in drop}
    if zip_format:
        W.write_zip(path, main, raw)
    else:
        counts = {k: (len(data) // np.dtype(storages[k][1].dtype).itemsize, data) for k, data in raw.items()}
        path.write_bytes(W.legacy_bytes(main, counts))


# Round trips


@pytest.mark.parametrize("zip_format", FORMATS)
@pytest.mark.parametrize("offsets", [False, True], ids=["own-storage", "shared-offset-transposed"])
@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big"])
def test_round_trip_is_exact(tmp_path, zip_format, offsets, big_endian):
    state = sample_state()
    path = tmp_path / "w.pth"
    W.write_pth(path, state, zip_format=zip_format, offsets=offsets, big_endian=big_endian)
    assert_same(read_pth(path), state)


@pytest.mark.parametrize("zip_format", FORMATS)
def test_cuda_storages_prefix_and_str_paths(tmp_path, zip_format):
    state = sample_state()
    path = tmp_path / "gpu.pth"
    W.write_pth(path, state, zip_format=zip_format, location="cuda:0", prefix="resnet_epoch9")
    assert_same(read_pth(str(path)), state)


def test_bfloat16_widens_exactly(tmp_path):
    bits = np.array([0x3F80, 0xC020, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x7F7F, 0x7FC0], np.uint16)
    values = (bits.astype(np.uint32) << 16).view(np.float32)
    for zip_format in (False, True):
        W.write_pth(tmp_path / "b.pth", {"w": W.BFloat16(values)}, zip_format=zip_format)
        got = read_pth(tmp_path / "b.pth")["w"]
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), values.view(np.uint32))


def test_old_big_endian_builds_native_storage_counts(tmp_path):
    # Legacy storages are little-endian on any machine; some old big-endian builds wrote the count natively.
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = tmp_path / "old.pth"
    W.write_pth(path, state, zip_format=False, big_endian=True, count_big_endian=True)
    assert_same(read_pth(path), state)


def test_zip_without_a_byteorder_record_is_little_endian(tmp_path):
    storages = {"0": ("float32", np.arange(4, dtype=np.float32))}
    W.write_zip(tmp_path / "z.pth", W.state_pickle({"w": W.View("0", 0, (4,), (1,))}, storages, legacy=False),
                {"0": W._raw("float32", storages["0"][1], False)}, byteorder=None)
    assert np.array_equal(read_pth(tmp_path / "z.pth")["w"], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("zip_format", FORMATS)
@pytest.mark.parametrize("under", ["state_dict", "model"])
def test_training_checkpoints_give_their_state_dict(tmp_path, zip_format, under):
    weights = {"conv.weight": np.ones((2, 1, 1, 1), np.float32), "conv.bias": np.zeros(2, np.float32)}
    checkpoint = {"epoch": 12, under: weights, "optimizer": {"lr": 0.01, "momentum": 0.9}, "arch": "largefov"}
    W.write_pth(tmp_path / "c.pth", checkpoint, zip_format=zip_format)
    assert_same(read_pth(tmp_path / "c.pth"), weights)


@pytest.mark.parametrize("zip_format", FORMATS)
def test_non_tensor_values_are_dropped(tmp_path, zip_format):
    W.write_pth(tmp_path / "s.pth", {"w": np.ones(3, np.float32), "version": 2, "note": "hi"}, zip_format=zip_format)
    assert list(read_pth(tmp_path / "s.pth")) == ["w"]


@pytest.mark.parametrize("zip_format", FORMATS)
def test_views_reading_one_storage_several_ways(tmp_path, zip_format):
    flat = np.arange(12, dtype=np.float32)
    placed = {"t": W.View("0", 1, (3, 2), (1, 3)),  # transposed, offset
              "bcast": W.View("0", 11, (2, 3), (0, 0)),  # stride 0: one element repeated
              "last": W.View("0", 11, (), ()), "none": W.View("0", 12, (0,), (1,))}
    write_views(tmp_path / "v.pth", {"0": ("float32", flat)}, placed, zip_format)
    got = read_pth(tmp_path / "v.pth")
    assert np.array_equal(got["t"], [[1, 4], [2, 5], [3, 6]]) and got["t"].flags.c_contiguous
    assert np.array_equal(got["bcast"], np.full((2, 3), 11.0)) and got["last"].shape == ()
    assert got["last"] == 11 and got["none"].shape == (0,)


def test_legacy_storage_views(tmp_path):
    # torch < 0.4 could record a storage view: (view key, offset, size) inside the root storage.
    pid = ("storage", W.G("torch", "FloatStorage"), "root", "cpu", 10, ("view", 4, 3))
    tensor = W.Call(W.G("torch._utils", "_rebuild_tensor"), (W.PersId(pid), 1, (2,), (1,)))
    main = W.dumps(W.Ordered([("w", tensor)]))
    data = np.arange(10, dtype="<f4").tobytes()
    (tmp_path / "v.pth").write_bytes(W.legacy_bytes(main, {"root": (10, data)}))
    assert np.array_equal(read_pth(tmp_path / "v.pth")["w"], [5.0, 6.0])


def test_parameters_read_as_their_data(tmp_path):
    pid = ("storage", W.G("torch", "DoubleStorage"), "0", "cpu", 2)
    tensor = W.Call(W.G("torch._utils", "_rebuild_tensor_v2"), (W.PersId(pid), 0, (2,), (1,), True, W.Ordered([])))
    param = W.Call(W.G("torch._utils", "_rebuild_parameter"), (tensor, True, W.Ordered([])))
    W.write_zip(tmp_path / "p.pth", W.dumps({"p": param}), {"0": np.array([1.5, -2.0], "<f8").tobytes()})
    assert np.array_equal(read_pth(tmp_path / "p.pth")["p"], [1.5, -2.0])


# Telling a .pth by content


def test_format_detection(tmp_path):
    state = {"w": np.ones(2, np.float32)}
    W.write_pth(tmp_path / "l.pth", state, zip_format=False)
    W.write_pth(tmp_path / "z.pth", state, zip_format=True, prefix="z")
    np.savez(tmp_path / "a.npz", w=np.ones(2))
    legacy_head = (tmp_path / "l.pth").read_bytes()[:64]
    assert looks_like_legacy_pth(legacy_head) and not looks_like_legacy_pth(b"PK\x03\x04" + bytes(60))
    assert looks_like_legacy_pth(pickle.dumps(pth.MAGIC, protocol=4))  # torch.save(pickle_protocol=4)
    assert not looks_like_legacy_pth(pickle.dumps(12345, protocol=2)) and not looks_like_legacy_pth(b"")
    assert is_torch_zip(tmp_path / "z.pth") and not is_torch_zip(tmp_path / "a.npz")
    assert not is_torch_zip(tmp_path / "l.pth") and not is_torch_zip(tmp_path / "missing")
    assert is_pth(tmp_path / "l.pth") and is_pth(tmp_path / "z.pth") and not is_pth(tmp_path / "a.npz")


# Damaged files


@pytest.mark.parametrize("zip_format", FORMATS)
def test_truncated_files_are_refused(tmp_path, zip_format):
    path = tmp_path / "w.pth"
    W.write_pth(path, sample_state(), zip_format=zip_format)
    whole = path.read_bytes()
    for size in (40, len(whole) // 3, len(whole) // 2, len(whole) - 9, len(whole) - 1):
        path.write_bytes(whole[:size])
        refusal(path)


@pytest.mark.parametrize("zip_format", FORMATS)
@pytest.mark.parametrize("view, reads", [
    (W.View("0", 2, (3,), (1,)), "reaches element 4 of storage 0, which has 4"),
    (W.View("0", 0, (2, 2), (3, 1)), "reaches element 4"),
    (W.View("0", 4, (), ()), "reaches element 4"),
    (W.View("0", 0, (2**40, 2**40), (0, 0)), "repeats its storage"),
    (W.View("0", -1, (2,), (1,)), "offset is not non-negative"),
    (W.View("0", 0, (2,), (-1,)), "stride is not non-negative"),
    (W.View("0", 0, (2, 2), (1,)), "size (2, 2) but stride (1,)"),
])
def test_views_beyond_their_storage_are_refused(tmp_path, zip_format, view, reads):
    write_views(tmp_path / "v.pth", {"0": ("float32", np.arange(4, dtype=np.float32))}, {"w": view}, zip_format)
    refusal(tmp_path / "v.pth", reads)


@pytest.mark.parametrize("zip_format", FORMATS)
def test_storages_shorter_than_recorded_or_missing(tmp_path, zip_format):
    storages = {"0": ("float32", np.arange(4, dtype=np.float32))}
    placed = {"w": W.View("0", 0, (4,), (1,))}
    write_views(tmp_path / "short.pth", storages, placed, zip_format, cut={"0": 12})
    refusal(tmp_path / "short.pth", "storage 0")
    write_views(tmp_path / "none.pth", storages, placed, zip_format, drop=("0",))
    refusal(tmp_path / "none.pth", "storage 0 is missing")


def test_garbage_is_refused(tmp_path):
    cases = {"empty.pth": b"", "noise.pth": np.random.default_rng(0).bytes(4096), "text.pth": b"hello\n",
             "pickle.pth": pickle.dumps({"w": [1.0, 2.0]}, protocol=2)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        refusal(tmp_path / name, "not a PyTorch .pth")
    np.savez(tmp_path / "a.npz", w=np.ones(2))
    refusal(tmp_path / "a.npz", "not one torch.save wrote")
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as z:
        z.writestr("net/data.pkl", W.dumps({})), z.writestr("net/code/__torch__/net.py", "")
    refusal(tmp_path / "script.pt", "TorchScript")
    with tarfile.open(tmp_path / "old.pth", "w") as tar:
        info = tarfile.TarInfo("storages")
        tar.addfile(info, io.BytesIO(b""))
    refusal(tmp_path / "old.pth", "tar-format")
    refusal(tmp_path / "absent.pth", "cannot read")
    (tmp_path / "a-dir.pth").mkdir()
    refusal(tmp_path / "a-dir.pth", "cannot read")


@pytest.mark.parametrize("zip_format", FORMATS)
def test_not_a_state_dict_is_refused(tmp_path, zip_format):
    def write(main):
        if zip_format:
            W.write_zip(tmp_path / "x.pth", W.dumps(main), {})
        else:
            (tmp_path / "x.pth").write_bytes(W.legacy_bytes(W.dumps(main), {}))
        return tmp_path / "x.pth"

    refusal(write([1, 2]), "holds a list, not a state_dict")
    refusal(write({"epoch": 3, "lr": 0.1}), "holds no tensors by name")
    refusal(write({"state_dict": {}}), "holds no tensors by name")
    pid = ("storage", W.G("torch", "FloatStorage"), "0", "cpu", 0) + (() if zip_format else (None,))
    tensor = W.Call(W.G("torch._utils", "_rebuild_tensor_v2"), (W.PersId(pid), 0, (0,), (1,), False, W.Ordered([])))
    refusal(write({3: tensor}), "stored under 3, not under a name")
    refusal(write(W.Call(W.G("torch.nn.modules.conv", "Conv2d"), ())), "whole pickled model", "Conv2d")
    refusal(write(W.Call(W.G("__main__", "Net"), ())), "refused: its pickle calls __main__.Net")
    refusal(write({"w": W.Call(W.G("torch", "FloatStorage"), ())}), "calls torch.FloatStorage")
    pid = ("storage", "torch.FloatStorage", "0", "cpu", 1) + (() if zip_format else (None,))
    refusal(write({"w": W.PersId(pid)}), "not a storage")
    refusal(write({"w": W.PersId(("tensor", 1))}), "unknown persistent id")


def test_a_legacy_whole_model_is_refused(tmp_path):
    # torch.save(model) in the legacy format records each nn.Module class as ('module', class, file, source).
    main = W.dumps({"m": W.PersId(("module", None, None, None))})
    (tmp_path / "m.pth").write_bytes(W.legacy_bytes(main, {}))
    refusal(tmp_path / "m.pth", "whole pickled model")


# Hostile pickles


@pytest.fixture
def no_code_runs(monkeypatch):
    """os.system and friends fail the test if anything calls them; os.system is registered as an
    extension code, as a hostile file's author would hope it is."""
    def called(*args, **kwargs):
        pytest.fail(f"the reader ran code: {args}")

    for module, name in ((os, "system"), (posix, "system"), (subprocess, "Popen")):
        monkeypatch.setattr(module, name, called)
    copyreg.add_extension("os", "system", W.EXT_CODE)
    yield
    copyreg.remove_extension("os", "system", W.EXT_CODE)


@pytest.mark.parametrize("zip_format", FORMATS)
@pytest.mark.parametrize("kind", sorted(W.REFUSED))
def test_hostile_pickles_are_refused_before_running(tmp_path, no_code_runs, zip_format, kind):
    marker = tmp_path / "ran"
    bad = W.malicious_pickle(kind, marker)
    if zip_format:
        W.write_zip(tmp_path / "bad.pth", bad, {})
    else:
        (tmp_path / "bad.pth").write_bytes(W.legacy_bytes(bad, {}))
    message = refusal(tmp_path / "bad.pth", f"refused: its pickle calls {W.REFUSED[kind]},")
    assert message.endswith("which a state_dict never needs (a .pth is only read as data here)")
    assert not marker.exists()


def test_the_hostile_pickles_do_run_code_when_unpickled(tmp_path):
    # Proof that the refusals above refuse something real: plain pickle, in a child process, runs each.
    kinds = [k for k in W.REFUSED if k != "nested" or importlib.util.find_spec("torch")]
    for kind in kinds:
        (tmp_path / f"{kind}.pkl").write_bytes(W.malicious_pickle(kind, tmp_path / f"{kind}.ran"))
    script = (f"import copyreg, pickle, sys\ncopyreg.add_extension('os', 'system', {W.EXT_CODE})\n"
              "for name in sys.argv[1:]:\n    try:\n        pickle.loads(open(name, 'rb').read())\n"
              "    except Exception:\n        pass\n")
    subprocess.run([sys.executable, "-c", script, *(str(tmp_path / f"{k}.pkl") for k in kinds)], check=True,
                   timeout=120)
    deadline = time.monotonic() + 10  # Popen's touch may still be running
    while any(not (tmp_path / f"{k}.ran").exists() for k in kinds) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [k for k in kinds if not (tmp_path / f"{k}.ran").exists()] == []


def test_every_global_opcode_goes_through_find_class(no_code_runs):
    # GLOBAL, STACK_GLOBAL, INST, OBJ's class and EXT (with copyreg's cache empty) all reach find_class.
    copyreg.clear_extension_cache()
    for kind in ("reduce", "stack_global", "inst", "obj", "ext", "dotted"):
        with pytest.raises(pth._Bad, match="refused"):
            pth._Unpickler(W.malicious_pickle(kind, "/nonexistent/x"), pth._no_storage).load()


def test_ext_codes_are_refused_even_from_copyregs_cache(tmp_path):
    # Once any unpickling in the process has resolved an extension code, the unpickler takes it from
    # copyreg's cache without asking find_class: so the reader refuses EXT opcodes before unpickling.
    ext = W.dumps(W.Ext(W.EXT_CODE))
    copyreg.add_extension("builtins", "len", W.EXT_CODE)  # harmless to resolve
    try:
        assert pickle.loads(ext) is len
        assert pth._Unpickler(ext, pth._no_storage).load() is len  # the bypass the scan closes
        W.write_zip(tmp_path / "e.pth", W.dumps({"w": W.Call(W.Ext(W.EXT_CODE), ([1],))}), {})
        refusal(tmp_path / "e.pth", "refused: its pickle calls builtins.len")
    finally:
        copyreg.remove_extension("builtins", "len", W.EXT_CODE)
        copyreg.clear_extension_cache()
    W.write_zip(tmp_path / "u.pth", ext, {})
    refusal(tmp_path / "u.pth", f"refused: its pickle uses extension code {W.EXT_CODE}")


@pytest.mark.parametrize("zip_format", FORMATS)
def test_build_cannot_rewrite_the_allowlist(tmp_path, zip_format):
    # BUILD sets attributes; the allowlisted globals are immutable, so a file cannot swap their functions.
    target = W.G("torch._utils", "_rebuild_tensor_v2")
    build = W.dumps({"x": W.Build(target, (None, {"fn": W.G("collections", "OrderedDict")}))})
    if zip_format:
        W.write_zip(tmp_path / "b.pth", build, {})
    else:
        (tmp_path / "b.pth").write_bytes(W.legacy_bytes(build, {}))
    refusal(tmp_path / "b.pth")
    assert pth._ALLOWED[("torch._utils", "_rebuild_tensor_v2")].fn is pth._rebuild_v2
    W.write_pth(tmp_path / "ok.pth", {"w": np.ones(2, np.float32)}, zip_format=zip_format)
    assert np.array_equal(read_pth(tmp_path / "ok.pth")["w"], [1, 1])


# Cross-checks with torch itself


def torch_state(torch):
    """A DataParallel-wrapped model's state_dict and tensors of every dtype read here, non-contiguous
    ones and views sharing one storage among them."""
    model = torch.nn.Module()
    model.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = torch.nn.DataParallel(model).state_dict()
    with torch.no_grad():
        for value in state.values():
            if value.is_floating_point():
                value.normal_()
    base = torch.randn(6, 5)
    state.update({
        "half": torch.randn(3, 4).half(), "bf16": torch.randn(4, 2).bfloat16(), "double": torch.randn(2, 2).double(),
        "transposed": base.t(), "rows": base[1:3], "column": base[:, 2], "tail": base[4:],
        "mask": torch.rand(5) > 0.5, "u8": torch.arange(6, dtype=torch.uint8), "i8": torch.tensor([-5, 6], dtype=torch.int8),
        "i16": torch.tensor([-300], dtype=torch.int16), "i32": torch.arange(3, dtype=torch.int32),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "neg": torch._neg_view(torch.randn(3)),
        "expanded": torch.randn(1, 3).expand(4, 3),
    })
    return state


def as_numpy(tensor):
    """The values as numpy holds them: the neg bit applied, bfloat16 widened to float32."""
    tensor = tensor.detach().resolve_neg()
    return (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).contiguous().numpy()


@pytest.mark.crosscheck
@pytest.mark.parametrize("zip_format", FORMATS)
def test_torch_save_files_read_equal(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    state = torch_state(torch)
    assert "module.features.0.weight" in state and "module.features.1.num_batches_tracked" in state
    path = tmp_path / "t.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    got = read_pth(path)
    assert list(got) == list(state)
    for key, tensor in state.items():
        want = as_numpy(tensor)
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert got[key].tobytes() == want.tobytes(), key


@pytest.mark.crosscheck
@pytest.mark.parametrize("zip_format", FORMATS)
def test_torch_checkpoints_parameters_and_models(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3, 2, 2)).sum().backward()
    optimizer.step()
    checkpoint = {"epoch": 4, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, tmp_path / "c.pth", _use_new_zipfile_serialization=zip_format)
    got = read_pth(tmp_path / "c.pth")
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.numpy().tobytes() for k, v in model.state_dict().items()}
    torch.save(dict(model.named_parameters()), tmp_path / "p.pth", _use_new_zipfile_serialization=zip_format)
    assert np.array_equal(read_pth(tmp_path / "p.pth")["0.bias"], model[0].bias.detach().numpy())
    torch.save(model, tmp_path / "m.pth", _use_new_zipfile_serialization=zip_format)
    refusal(tmp_path / "m.pth", "refused: it is a whole pickled model (torch.nn.modules.")
    torch.save(model.state_dict(), tmp_path / "p4.pth", _use_new_zipfile_serialization=zip_format, pickle_protocol=4)
    assert is_pth(tmp_path / "p4.pth") and list(read_pth(tmp_path / "p4.pth")) == ["0.weight", "0.bias"]


@pytest.mark.crosscheck
@pytest.mark.parametrize("zip_format", FORMATS)
@pytest.mark.parametrize("offsets", [False, True], ids=["own-storage", "shared-offset-transposed"])
@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big"])
def test_torch_reads_the_writers_files_equal(tmp_path, zip_format, offsets, big_endian):
    torch = pytest.importorskip("torch")
    state = sample_state()
    path = tmp_path / "w.pth"
    W.write_pth(path, state, zip_format=zip_format, offsets=offsets, big_endian=big_endian, location="cuda:0")
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    assert list(loaded) == list(state)
    for key, value in state.items():
        want = expected(value)
        got = as_numpy(loaded[key])
        assert got.dtype == want.dtype and got.tobytes() == np.ascontiguousarray(want).tobytes(), key
