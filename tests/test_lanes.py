"""CPU lanes: whole images through every stage in lane processes, the serial path's outputs exactly."""

from deeplab_cli.run import stages
from deeplab_cli.io.inputs import collect
from deeplab_cli.run.lanes import segment_on_lanes
from test_pipeline import run


def test_lanes_write_what_the_serial_path_writes(folder, session, onnx_model, tmp_path):
    serial = run(folder, session, tmp_path / "serial")
    settings = stages.Settings(out=tmp_path / "lanes", formats=("index", "probs", "logits"))
    lanes = {r.job.key: r for r in segment_on_lanes(collect([str(folder)]), onnx_model, settings, 2)}
    assert {k: r.status for k, r in serial.items()} == {k: r.status for k, r in lanes.items()}
    for path in (tmp_path / "serial").rglob("*.*"):
        assert path.read_bytes() == (tmp_path / "lanes" / path.name).read_bytes(), path.name
    again = list(segment_on_lanes(collect([str(folder)]), onnx_model, settings, 2))
    assert sorted(r.status for r in again) == ["error"] + ["skipped"] * 5
