"""deeplab_cli.run.segment: the one entry of a segmentation run, as a library call."""

import pytest

from deeplab_cli.errors import UsageError
from deeplab_cli.io.inputs import collect
from deeplab_cli.run.segment import SegmentRequest, segment_images


def test_a_run_yields_every_job_and_counts_them(photo_folder, onnx_model, tmp_path):
    jobs = collect([str(photo_folder / "cats")])
    request = SegmentRequest(out=tmp_path / "m", model=str(onnx_model), device="cpu", workers=0, crf=False)
    run = segment_images(jobs, request)
    seen = []
    counts = run.drive(0.0, seen.append)
    assert run.total == len(jobs) == len(seen) and counts["ok"] == len(jobs)
    assert run.provider == "CPUExecutionProvider" and (tmp_path / "m" / "classes.json").is_file()
    again = segment_images(jobs, request)
    assert again.drive(0.0, lambda result: None)["skipped"] == len(jobs)  # complete outputs are kept


@pytest.mark.parametrize("changes, message", [
    ({"device": "gpu"}, "--device: "),
    ({"engine": "ray", "workers": 2}, "--jobs: Ray schedules the CRF tasks itself"),
])
def test_inconsistent_requests_fail_before_any_work(onnx_model, tmp_path, changes, message):
    request = SegmentRequest(out=tmp_path / "m", model=str(onnx_model), **changes)
    with pytest.raises(UsageError, match=message):
        segment_images([], request)
    assert not (tmp_path / "m").exists()
