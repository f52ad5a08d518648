"""`deeplab segment` as a user runs it: a messy folder in, masks out, honest exit codes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import BAD_IMAGES, CUDA_OFFERED, GOOD_IMAGES, assert_one_line_error, children_of, needs_cuda
from deeplab_cli.cli import cli
from deeplab_cli.io.images import load_image
from deeplab_cli.synthetic import natural_image
from golden_cases import golden_labels, sha256


def segment(*args, input=None, env=None):
    return CliRunner(env=env).invoke(cli, ["segment", *map(str, args)], input=input)


def mask_path(out, name):
    return out / (name.rsplit(".", 1)[0] + ".png")


def test_folder_end_to_end(photo_folder, onnx_model, tmp_path):
    out = tmp_path / "masks"
    result = segment(photo_folder, "-r", "--out", out, "-m", onnx_model, "--device", "cpu")
    assert result.exit_code == 1
    for name in BAD_IMAGES:
        assert any(str(photo_folder / name) in line for line in result.stderr.splitlines())
    assert "8 done, 0 skipped (already done), 3 failed" in result.stderr
    assert "Traceback" not in result.output
    written = sorted(Path(line) for line in result.stdout.splitlines())
    assert written == sorted(mask_path(out, n) for n in GOOD_IMAGES)
    for name in GOOD_IMAGES:
        image = load_image(photo_folder / name)
        labels = np.array(Image.open(mask_path(out, name)))
        assert labels.shape == image.shape[:2]
        expected, image_sha256 = golden_labels(f"labels: {name}")
        # A bound, not bit for bit: the reference is DeepLab's own (its unary clipped at 1e-5).
        assert (labels == expected).mean() >= 0.995, (name, "image as the reference's:", sha256(image) == image_sha256)
    classes = json.loads((out / "classes.json").read_text())
    assert classes[15]["name"] == "person" and classes[1]["color"] == [128, 0, 0]


def test_no_crf_labels_are_the_upsampled_argmax(onnx_model, tmp_path):
    image = natural_image(43, 57, seed=11)
    cv2.imwrite(str(tmp_path / "x.png"), image)
    result = segment(tmp_path / "x.png", "--out", tmp_path / "m", "-m", onnx_model, "--no-crf")
    assert result.exit_code == 0, result.output
    labels = np.array(Image.open(tmp_path / "m/x.png"))
    assert (labels == golden_labels("labels: 43x57 seed 11, no CRF")[0]).mean() >= 0.999


def test_pad_to_reproduces_the_padded_protocol(onnx_model, tmp_path):
    image = natural_image(50, 41, seed=12)
    cv2.imwrite(str(tmp_path / "x.png"), image)
    result = segment(tmp_path / "x.png", "--out", tmp_path / "m", "-m", onnx_model, "--no-crf", "--pad-to", "97")
    assert result.exit_code == 0, result.output
    labels = np.array(Image.open(tmp_path / "m/x.png"))
    assert (labels == golden_labels("labels: 50x41 seed 12 padded to 97x97, no CRF")[0]).mean() >= 0.999


def test_formats_and_large_images(onnx_model, tmp_path):
    cv2.imwrite(str(tmp_path / "big.jpg"), natural_image(120, 90, seed=13))
    out = tmp_path / "m"
    result = segment(tmp_path / "big.jpg", "--out", out, "-m", onnx_model, "--max-size", "60",
                     *[a for f in ("index", "color", "overlay", "probs", "logits") for a in ("-f", f)])
    assert result.exit_code == 0, result.output
    labels = np.array(Image.open(out / "big.png"))
    assert labels.shape == (120, 90)
    color = cv2.imread(str(out / "big.color.png"))
    assert color.shape == (120, 90, 3)
    assert cv2.imread(str(out / "big.overlay.png")).shape == (120, 90, 3)
    with np.load(out / "big.probs.npz") as npz:
        probs = npz["probs"]
    assert probs.dtype == np.float16 and probs.shape == (21, 120, 90)
    assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
    assert (probs.argmax(0) == labels).mean() > 0.99
    with np.load(out / "big.logits.npz") as npz:
        assert npz["logits"].shape == (21, 9, 7)  # the network saw 60x45: 60 -> 31 -> 16 -> 9
        assert tuple(npz["work_size"]) == (60, 45) and tuple(npz["image_size"]) == (120, 90)


def test_json_lines(photo_folder, onnx_model, tmp_path):
    result = segment(photo_folder, "--out", tmp_path / "m", "-m", onnx_model, "--json", "--no-crf")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    top_level = sorted(p.name for p in photo_folder.iterdir() if p.is_file())
    assert sorted(Path(r["input"]).name for r in records) == top_level
    by_name = {Path(r["input"]).name: r for r in records}
    assert by_name["gray.png"]["status"] == "ok" and by_name["gray.png"]["error"] is None
    assert by_name["gray.png"]["outputs"] == [str(tmp_path / "m/gray.png")]
    assert {"load", "network", "upsample", "write"} <= set(by_name["gray.png"]["timings"])
    assert by_name["gray.png"]["provider"] == "CPUExecutionProvider"
    assert by_name["notes.png"]["status"] == "error" and "notes.png" in by_name["notes.png"]["error"]
    assert result.exit_code == 1


@needs_cuda
def test_segment_on_cuda_gives_the_cpu_masks(photo_folder, onnx_model, probs_model, tmp_path):
    """Both graphs on the GPU: the plain one (CRF workers upsample) and the one that upsamples itself."""
    cpu = segment(photo_folder, "-r", "--out", tmp_path / "cpu", "-m", onnx_model, "--device", "cpu")
    for model in (onnx_model, probs_model):
        out = tmp_path / model.stem
        gpu = segment(photo_folder, "-r", "--out", out, "-m", model, "--device", "cuda", "--json", "-q")
        assert gpu.exit_code == cpu.exit_code == 1
        records = [json.loads(line) for line in gpu.stdout.splitlines()]
        assert sorted(r["status"] for r in records) == ["error"] * len(BAD_IMAGES) + ["ok"] * len(GOOD_IMAGES)
        assert {r["provider"] for r in records} == {"CUDAExecutionProvider"}
        for name in GOOD_IMAGES:
            a, b = (np.array(Image.open(mask_path(d, name))) for d in (tmp_path / "cpu", out))
            assert (a == b).mean() >= 0.995, (model.name, name)  # other kernels: the bound against the reference


def test_resume_and_overwrite(photo_folder, onnx_model, tmp_path):
    out = tmp_path / "m"
    args = (photo_folder / "cats", photo_folder / "dogs", "--out", out, "-m", onnx_model, "--no-crf")
    assert segment(*args).exit_code == 0
    masks = [out / "cats/a.png", out / "dogs/a.png"]
    stamps = [p.stat().st_mtime_ns for p in masks]
    again = segment(*args)
    assert again.exit_code == 0 and again.stdout == ""
    assert "0 done, 2 skipped" in again.stderr
    assert [p.stat().st_mtime_ns for p in masks] == stamps
    redo = segment(*args, "--overwrite")
    assert redo.exit_code == 0 and len(redo.stdout.splitlines()) == 2
    assert [p.stat().st_mtime_ns for p in masks] != stamps


def test_paths_on_stdin(photo_folder, onnx_model, tmp_path):
    listing = f"{photo_folder / 'cats/a.jpg'}\n\n{photo_folder / 'dogs/a.jpg'}\n"
    result = segment("-", "--out", tmp_path / "m", "-m", onnx_model, "--no-crf", input=listing)
    assert result.exit_code == 0, result.output
    assert sorted(result.stdout.splitlines()) == [str(tmp_path / "m/cats/a.png"), str(tmp_path / "m/dogs/a.png")]


def test_nul_separated_lists_keep_names_with_newlines(photo_folder, onnx_model, tmp_path):
    odd = tmp_path / "in" / "two\nlines.jpg"
    odd.parent.mkdir()
    odd.write_bytes((photo_folder / "cats/a.jpg").read_bytes())
    listing = f"{odd}\0{photo_folder / 'dogs/a.jpg'}\0".encode()
    out = tmp_path / "m"
    result = segment("-0", "-", "--out", out, "-m", onnx_model, "--no-crf", "-f", "logits", input=listing)
    assert result.exit_code == 0, result.output
    keys = ["in/two\nlines", "img/dogs/a"]  # relative to the folder holding both
    assert all((out / f"{key}.logits.npz").is_file() for key in keys)
    again = CliRunner().invoke(cli, ["crf", "--null", "-", str(out), "--out", str(tmp_path / "c"), "-j", "1",
                                     "--json"], input=listing)
    assert again.exit_code == 0, again.output
    assert sorted(json.loads(line)["input"] for line in again.stdout.splitlines()) == sorted(
        [str(odd), str(photo_folder / "dogs/a.jpg")])
    # Without -0 the same bytes are one odd name per line, and none of them exists.
    plain = segment("-", "--out", tmp_path / "p", "-m", onnx_model, "--no-crf", input=listing)
    assert plain.exit_code == 1 and "0 done" in plain.stderr


def test_a_killed_runs_temporaries_are_swept_but_not_a_live_shards(photo_folder, onnx_model, tmp_path):
    import fcntl

    out = tmp_path / "m"
    args = (photo_folder / "cats", photo_folder / "dogs", "--out", out, "-m", onnx_model, "--no-crf", "-j", "0")
    assert segment(*args).exit_code == 0
    dead = [out / ".classes.json.0123456789ab.tmp", out / "cats/.a.png.0123456789ab.tmp"]
    for path in dead:
        path.write_text("half")
    live = out / ".classes.json.ba9876543210.tmp"
    with open(live, "w") as held:  # another shard, writing its classes.json right now
        fcntl.flock(held, fcntl.LOCK_EX)
        result = segment(*args)  # everything is done already: the sweep is all this run does
        assert result.exit_code == 0 and "0 done, 2 skipped" in result.stderr
        assert not any(path.exists() for path in dead)
        assert live.exists()


def test_shards_cover_the_folder_once(photo_folder, onnx_model, tmp_path):
    out = tmp_path / "m"
    written = []
    for k in range(3):
        result = segment(photo_folder, "-r", "--out", out, "-m", onnx_model, "--no-crf", "--shard", f"{k}/3")
        written += result.stdout.splitlines()
    assert sorted(written) == sorted(str(mask_path(out, n)) for n in GOOD_IMAGES)


def test_usage_errors_exit_2(photo_folder, onnx_model, tmp_path):
    for bad in (["--shard", "3/3"], ["--device", "tpu"], ["--format", "jpeg"], ["--alpha", "2"]):
        result = segment(photo_folder, "--out", tmp_path / "m", "-m", onnx_model, *bad)
        assert result.exit_code == 2, (bad, result.output)
        assert "Traceback" not in result.output


def test_missing_model_offline_exits_3(photo_folder, tmp_path):
    env = {"DEEPLAB_HOME": str(tmp_path / "cache"), "DEEPLAB_OFFLINE": "1"}
    result = segment(photo_folder, "--out", tmp_path / "m", env=env)
    assert result.exit_code == 3
    assert "deeplab models pull largefov-voc12" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sigkill_leaves_only_complete_files_and_resumes(onnx_model, tmp_path):
    src = tmp_path / "img"
    src.mkdir()
    for i in range(10):
        cv2.imwrite(str(src / f"{i}.png"), natural_image(160, 200, seed=20 + i))
    out = tmp_path / "m"
    command = [sys.executable, "-m", "deeplab_cli", "segment", str(src), "--out", str(out), "-m", str(onnx_model),
               "-f", "index", "-f", "probs", "--device", "cpu", "--threads", "1"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = child.stdout.readline()  # the first result is written: kill in the middle of the rest
    assert first
    time.sleep(0.3)
    workers = children_of(child.pid)
    assert workers  # the CRF worker processes
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "orphaned workers outlived the run"
    finished = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for path in finished:  # every visible file is complete
        if path.suffix == ".png":
            assert np.array(Image.open(path)).shape == (160, 200)
        elif path.suffix == ".npz":
            with np.load(path) as npz:
                assert npz["probs"].shape == (21, 160, 200)
    done_before = {p.name for p in finished}
    assert 0 < len([n for n in done_before if n.endswith(".probs.npz")]) < 10
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipped" in rerun.stderr
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(
        [f"{i}{s}" for i in range(10) for s in (".png", ".probs.npz")] + ["classes.json"])


def test_crf_on_saved_logits_gives_segments_masks(photo_folder, onnx_model, tmp_path):
    full = segment(photo_folder, "-r", "--out", tmp_path / "full", "-m", onnx_model, "-f", "index", "-f", "logits",
                   "--max-size", "40")
    assert full.exit_code == 1  # the three bad files
    result = CliRunner().invoke(cli, ["crf", str(photo_folder), str(tmp_path / "full"), "-r", "--out",
                                      str(tmp_path / "crf"), "--iters", "10", "-j", "2", "--json"])
    assert result.exit_code == 1
    records = {Path(r["input"]).relative_to(photo_folder).as_posix(): r
               for r in map(json.loads, result.stdout.splitlines())}
    assert {n for n, r in records.items() if r["status"] == "error"} == set(BAD_IMAGES)
    for name in GOOD_IMAGES:
        ours, theirs = (np.array(Image.open(mask_path(tmp_path / d, name))) for d in ("crf", "full"))
        assert ours.shape == theirs.shape
        assert (ours == theirs).mean() >= 0.999, name


def test_crf_names_missing_and_mismatched_logits(onnx_model, tmp_path):
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img/0.png"), natural_image(30, 40))
    cv2.imwrite(str(tmp_path / "img/1.png"), natural_image(30, 40))
    assert segment(tmp_path / "img", "--out", tmp_path / "l", "-m", onnx_model, "-f", "logits").exit_code == 0
    cv2.imwrite(str(tmp_path / "img/1.png"), natural_image(31, 40))
    cv2.imwrite(str(tmp_path / "img/2.png"), natural_image(30, 40))
    result = CliRunner().invoke(cli, ["crf", str(tmp_path / "img"), str(tmp_path / "l"), "--out", str(tmp_path / "m"),
                                      "-j", "1"])
    assert result.exit_code == 1
    assert "1 done, 0 skipped (already done), 2 failed" in result.stderr
    assert "is 31x40 but its logits were computed for 30x40" in result.stderr
    assert f"{tmp_path / 'l/2.logits.npz'}: no logits file" in result.stderr


def test_unwritable_output_folder_is_a_usage_error(photo_folder, onnx_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = segment(photo_folder, "--out", blocker / "masks", "-m", onnx_model)
    assert result.exit_code == 2
    assert f"{blocker / 'masks'}: cannot write to the output folder" in result.stderr
    assert "Traceback" not in result.output


def test_segment_shares_the_cores(photo_folder, onnx_model, tmp_path, monkeypatch):
    from deeplab_cli.run import lanes as lanes_module
    from deeplab_cli.model import runtime
    from deeplab_cli.run import scheduling

    opened, lanes = [], []
    real_open, real_lanes = runtime.open_session, lanes_module.segment_on_lanes

    def open_session(path, device, threads, spin=True):
        opened.append((threads, spin))
        return real_open(path, device, threads, spin)

    def segment_on_lanes(jobs, model_path, settings, workers, threads):
        lanes.append((workers, threads))
        return real_lanes(jobs, model_path, settings, workers, threads)

    monkeypatch.setattr(runtime, "open_session", open_session)
    monkeypatch.setattr(lanes_module, "segment_on_lanes", segment_on_lanes)
    monkeypatch.setattr(scheduling, "usable_cores", lambda: 2)
    args = (photo_folder / "cats", "-m", onnx_model, "--device", "cpu", "--no-crf")
    assert segment(*args, "--out", tmp_path / "a").exit_code == 0
    assert lanes == [(2, 1)]  # a single-threaded lane per core, each through every stage
    assert segment(*args, "--out", tmp_path / "b", "-j", "0").exit_code == 0
    assert opened[-1] == (2, True)  # one process: onnxruntime on both cores
    assert lanes == [(2, 1)]
    assert (tmp_path / "a/a.png").read_bytes() == (tmp_path / "b/a.png").read_bytes()


# Faults that batch jobs meet: each gives the exit code and one line a user expects, and never a
# half-written output.

def eight_photos(root):
    root.mkdir()
    for i in range(8):
        cv2.imwrite(str(root / f"{i}.png"), natural_image(60, 80, seed=70 + i))
    return root


def visible_files(out):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".")], "temporaries left behind"
    return files


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system, where the tests may mount one (root, as CI runs; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_stops_the_batch_with_one_line_and_a_rerun_resumes(onnx_model, small_disk, tmp_path):
    photos = eight_photos(tmp_path / "img")
    out = small_disk / "m"
    args = (photos, "--out", out, "-m", onnx_model, "-f", "index", "-f", "probs", "--no-crf", "-j", "0")
    result = segment(*args)  # each probs file is 200 KB: the disk fills up part-way
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "No space left on device" in line]
    assert len(errors) == 1 and errors[0].startswith(f"deeplab: {out}/")  # one image, then the batch stops
    assert "stopped (the output cannot take more)" in result.stderr
    files = visible_files(out)
    for path in files:
        if path.name.endswith(".npz"):
            with np.load(path) as npz:
                assert npz["probs"].shape == (21, 60, 80)
    assert 0 < len([p for p in files if p.name.endswith(".npz")]) < 8
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert segment(*args).exit_code == 0
    assert len(visible_files(out)) == 17


def test_an_output_disk_turned_read_only_part_way_stops_the_batch(onnx_model, small_disk, tmp_path, monkeypatch):
    from deeplab_cli.io import outputs

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    real, written = outputs.write_outputs, []

    def write_then_remount(*args, **kwargs):
        real(*args, **kwargs)
        written.append(1)
        if len(written) == 3:  # as when a file system errors out and the kernel remounts it read-only
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

    monkeypatch.setattr(outputs, "write_outputs", write_then_remount)
    out = small_disk / "m"
    result = segment(eight_photos(tmp_path / "img"), "--out", out, "-m", onnx_model, "--no-crf", "-j", "0")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if "Read-only file system" in line]
    assert errors == [f"deeplab: {out}/3.png: cannot write (Read-only file system)"]
    assert "3 done, 0 skipped (already done), 1 failed" in result.stderr
    assert "stopped (the output cannot take more); 4 not done" in result.stderr


def test_an_injected_enospc_stops_the_batch(onnx_model, tmp_path, monkeypatch):
    import errno

    from deeplab_cli.io import outputs

    real = outputs.write_npz_streamed

    def full(path, *args):
        if path.name.startswith("2."):
            def half_then_full(tmp):
                tmp.write_bytes(b"half")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            outputs.atomic_write(path, half_then_full)
        real(path, *args)

    monkeypatch.setattr(outputs, "write_npz_streamed", full)
    out = tmp_path / "m"
    result = segment(eight_photos(tmp_path / "img"), "--out", out, "-m", onnx_model, "--no-crf", "-j", "0",
                     "-f", "probs")
    assert result.exit_code == 1
    assert f"deeplab: {out}/2.probs.npz: cannot write (No space left on device)" in result.stderr.splitlines()
    assert sorted(p.name for p in visible_files(out)) == ["0.probs.npz", "1.probs.npz", "classes.json"]


def test_a_folder_that_refuses_one_output_costs_only_that_image(onnx_model, tmp_path, monkeypatch):
    from deeplab_cli.io import outputs

    real = outputs.write_index_png

    def deny(path, *args):
        if path.name == "5.png":  # chmod cannot deny root, who runs CI: the error is injected
            raise PermissionError(13, "Permission denied", str(path))
        real(path, *args)

    monkeypatch.setattr(outputs, "write_index_png", deny)
    out = tmp_path / "m"
    result = segment(eight_photos(tmp_path / "img"), "--out", out, "-m", onnx_model, "--no-crf", "-j", "0")
    assert result.exit_code == 1
    assert f"deeplab: {out}/5.png: cannot write (Permission denied)" in result.stderr.splitlines()
    assert "7 done, 0 skipped (already done), 1 failed" in result.stderr  # not the whole device: the batch goes on


def test_inputs_that_vanish_or_change_kind_after_listing(onnx_model, tmp_path, monkeypatch):
    from deeplab_cli.io import inputs

    photos = eight_photos(tmp_path / "img")
    real = inputs.collect

    def collect_then_change(*args):
        jobs = real(*args)
        (photos / "1.png").unlink()
        (photos / "2.png").unlink()
        (photos / "2.png").mkdir()
        return jobs

    monkeypatch.setattr(inputs, "collect", collect_then_change)
    result = segment(photos, "--out", tmp_path / "m", "-m", onnx_model, "--no-crf", "-j", "0")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"deeplab: {photos}")]
    assert errors == [f"deeplab: {photos}/1.png: file not found",
                      f"deeplab: {photos}/2.png: is a directory, not an image file"]
    assert "6 done" in result.stderr


def test_a_fifo_and_a_symlink_loop_under_r_are_reported_not_waited_on(onnx_model, tmp_path):
    photos = eight_photos(tmp_path / "img")
    os.mkfifo(photos / "pipe.png")
    (photos / "sub").mkdir()
    (photos / "sub/up").symlink_to(photos)
    (photos / "sub/self.jpg").symlink_to(photos / "sub/self.jpg")
    command = [sys.executable, "-m", "deeplab_cli", "segment", str(photos), "-r", "--out", str(tmp_path / "m"),
               "-m", str(onnx_model), "--no-crf", "-j", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"deeplab: {photos}/pipe.png: not a regular file (a FIFO)" in result.stderr.splitlines()
    assert f"deeplab: {photos}/sub/self.jpg: cannot read (Too many levels of symbolic links)" in result.stderr
    assert "8 done, 0 skipped (already done), 2 failed" in result.stderr


@pytest.mark.crosscheck
def test_both_crf_backends_write_the_same_masks(photo_folder, onnx_model, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    args = (photo_folder / "cats", photo_folder / "dogs", "-m", onnx_model, "-f", "index", "-f", "probs", "-j", "1")
    assert segment(*args, "--out", tmp_path / "numba").exit_code == 0
    assert segment(*args, "--out", tmp_path / "ref", "--crf-backend", "pydensecrf").exit_code == 0
    for name in ("cats/a.png", "dogs/a.png", "cats/a.probs.npz"):
        assert (tmp_path / "numba" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_the_onnx_backend_writes_the_engines_masks_from_segment_and_from_saved_logits(photo_folder, onnx_model,
                                                                                    tmp_path):
    args = (photo_folder / "cats", photo_folder / "dogs", "-m", onnx_model, "-f", "index", "-f", "logits", "-j", "1")
    assert segment(*args, "--out", tmp_path / "numba").exit_code == 0
    assert segment(*args, "--out", tmp_path / "onnx", "--crf-backend", "onnx", "--device", "cpu").exit_code == 0
    crf = CliRunner().invoke(cli, ["crf", str(photo_folder / "cats"), str(photo_folder / "dogs"), str(tmp_path / "numba"),
                                   "--out", str(tmp_path / "crf"), "--crf-backend", "onnx", "-j", "1"])
    assert crf.exit_code == 0, crf.output
    for name in ("cats/a.png", "dogs/a.png"):
        expected = np.array(Image.open(tmp_path / "numba" / name))
        for out in ("onnx", "crf"):
            assert (np.array(Image.open(tmp_path / out / name)) == expected).mean() >= 0.9999, (out, name)


@pytest.mark.skipif(CUDA_OFFERED, reason="onnxruntime offers CUDA here")
def test_crf_on_a_device_onnxruntime_lacks_is_one_line_before_any_work(photo_folder, tmp_path):
    result = CliRunner().invoke(cli, ["crf", str(photo_folder), str(tmp_path), "--out", str(tmp_path / "m"),
                                      "--device", "cuda"])
    assert_one_line_error(result, 3, "--device cuda: onnxruntime has no CUDA provider")
    assert not (tmp_path / "m").exists()


def test_crf_tune_refuses_the_onnx_backend(tmp_path):
    result = CliRunner().invoke(cli, ["crf", "tune", str(tmp_path), str(tmp_path), "--gt", str(tmp_path),
                                      "--crf-backend", "onnx"])
    assert result.exit_code == 2 and "crf tune runs on the CPU: numba or pydensecrf" in result.output


def test_help_lists_the_crf_backends():
    text = CliRunner().invoke(cli, ["segment", "--help"]).output
    assert "--crf-backend [numba|pydensecrf|onnx]" in text
    for command in (["crf", "--help"], ["crf", "tune", "--help"]):
        assert "--crf-backend" in CliRunner().invoke(cli, command).output


def test_the_pydensecrf_backend_without_pydensecrf_is_one_line_saying_what_to_install(photo_folder, onnx_model,
                                                                                     tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    result = segment(photo_folder, "--out", tmp_path / "m", "-m", onnx_model, "--crf-backend", "pydensecrf")
    assert result.exit_code == 3
    assert result.stderr.strip() == ("Error: --crf-backend pydensecrf needs pydensecrf: pip install "
                                     "'deeplab-cli[pydensecrf]' (it compiles from source, with a C++ compiler, on "
                                     "Python 3.12 and older)")
    assert not (tmp_path / "m").exists()  # refused before any work


# Big images and bounded memory.

def test_an_image_over_the_pixel_limit_fails_alone_before_decoding(photo_folder, onnx_model, tmp_path, monkeypatch):
    import cv2 as opencv

    real, decoded = opencv.imdecode, []
    monkeypatch.setattr(opencv, "imdecode", lambda data, flags: decoded.append(len(data)) or real(data, flags))
    args = (photo_folder / "cats", photo_folder / "dogs", "-m", onnx_model, "--no-crf", "-j", "0")
    result = segment(*args, "--out", tmp_path / "a", "--max-pixels", "2000")  # cats/a is 61x45, dogs/a 45x37
    assert result.exit_code == 1
    assert (f"deeplab: {photo_folder / 'cats/a.jpg'}: image too large: 61x45 (2,745 pixels) is over the limit of "
            "2,000 pixels; raise it with --max-pixels or DEEPLAB_MAX_PIXELS") in result.stderr.splitlines()
    assert len(decoded) == 1  # only dogs/a was decoded
    assert (tmp_path / "a/dogs/a.png").is_file()
    from_env = segment(*args, "--out", tmp_path / "b", env={"DEEPLAB_MAX_PIXELS": "2000"})
    assert from_env.exit_code == 1 and "image too large: 61x45" in from_env.stderr
    assert segment(*args, "--out", tmp_path / "c", env={"DEEPLAB_MAX_PIXELS": "0"}).exit_code == 0  # no limit


def test_lanes_are_capped_by_an_injected_memory_limit_and_every_mask_is_written(photo_folder, onnx_model, tmp_path,
                                                                              monkeypatch):
    from deeplab_cli.run import lanes as lanes_module
    from deeplab_cli.run import memory
    from deeplab_cli.run import scheduling
    from test_memory import GB, fake_system

    proc, cgroup = fake_system(tmp_path / "sys", ["0::/job"], {"job/memory.max": str(GB), "job/memory.current": "0"},
                               mem_available_kb=20 * GB // 1024)
    real = memory.available_memory
    monkeypatch.setattr(memory, "available_memory", lambda: real(proc, cgroup))  # a 1 GiB cgroup limit
    monkeypatch.setattr(scheduling, "usable_cores", lambda: 2)
    lanes = []
    real_lanes = lanes_module.segment_on_lanes
    monkeypatch.setattr(lanes_module, "segment_on_lanes", lambda jobs, model, settings, n, threads: lanes.append(n) or
                        real_lanes(jobs, model, settings, n, threads))
    result = segment(photo_folder, "-r", "--out", tmp_path / "m", "-m", onnx_model, "--device", "cpu")
    assert result.exit_code == 1  # the three bad files, as always
    assert lanes == [1]  # two lanes of ~0.5 GiB each do not fit in 1 GiB
    notes = [line for line in result.stderr.splitlines() if "instead of" in line]
    assert notes == ["deeplab: 1 worker instead of 2: 1.0 GiB of memory available, about 0.5 GiB each for 61x45 "
                     "images"]
    assert len(result.stdout.splitlines()) == len(GOOD_IMAGES)


def test_an_image_too_big_for_the_memory_left_fails_alone(photo_folder, onnx_model, tmp_path, monkeypatch):
    from deeplab_cli.run import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 30_000)  # bytes: less than any image needs
    result = segment(photo_folder / "cats", photo_folder / "dogs", "--out", tmp_path / "m", "-m", onnx_model,
                     "-j", "0")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "too large for the memory left" in line]
    assert len(lines) == 2 and lines[0].startswith(f"deeplab: {photo_folder / 'cats/a.jpg'}: too large for the "
                                                   "memory left (61x45 needs about 0.0 GiB, 0.0 GiB available)")


def test_a_bad_crf_params_file_is_one_line_naming_it(photo_folder, onnx_model, tmp_path):
    bad = tmp_path / "best.json"
    bad.write_text("[4, 121]")
    result = segment(photo_folder / "cats", "--out", tmp_path / "m", "-m", onnx_model, "--crf-params", bad)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"Error: --crf-params {bad}: expected a JSON object of CRF settings"]
    assert not (tmp_path / "m").exists()  # nothing started
