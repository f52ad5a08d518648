"""The job-array recipes in examples/, run as written: shards at once into one tree, offline, resumable."""

import os
import subprocess
from pathlib import Path

import cv2
import pytest

from deeplab_cli.model import registry
from deeplab_cli.synthetic import natural_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def shared_home(largefov_caffemodel, tmp_path_factory):
    """A DEEPLAB_HOME with largefov-voc12 in it, as `deeplab models pull` leaves it on a shared disk."""
    home = tmp_path_factory.mktemp("deeplab_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPLAB_HOME", str(home))
        registry.import_file(registry.get_model("largefov-voc12"), largefov_caffemodel)
    return home


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for i in range(9):
        path = root / f"set{i % 3}" / f"img{i // 3}.jpg"  # the same names in three folders
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), natural_image(30 + i, 41, seed=i))
    return root


def expected_masks(photos, out):
    return sorted(out / p.relative_to(photos).with_suffix(".png") for p in photos.rglob("*.jpg"))


def masks(out):
    return sorted(p for p in out.rglob("*.png"))


def environment(home, **extra):
    # No route to the internet is needed: DEEPLAB_OFFLINE makes any attempt an error.
    return {**os.environ, "DEEPLAB_HOME": str(home), "OMP_NUM_THREADS": "1", **extra}


def test_xargs_recipe_runs_four_shards_at_once(shared_home, photos, tmp_path):
    out = tmp_path / "masks"
    env = environment(shared_home, DEEPLAB_OFFLINE="1")
    done = subprocess.run(["bash", str(EXAMPLES / "parallel.sh"), str(photos), str(out), "4"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert masks(out) == expected_masks(photos, out)
    assert not [p for p in out.rglob(".*")]  # no temporary left by the concurrent writers


def test_slurm_recipe_covers_the_folder_and_reruns_resume(shared_home, photos, tmp_path):
    out = tmp_path / "masks"
    script = (EXAMPLES / "slurm-array.sh").read_text()
    shards = int(script.split("SHARDS=")[1].split()[0])
    assert f"--array=0-{shards - 1}" in script
    tasks = [subprocess.Popen(["bash", str(EXAMPLES / "slurm-array.sh"), str(photos), str(out)],
                              env=environment(shared_home, SLURM_ARRAY_TASK_ID=str(k), SLURM_CPUS_PER_TASK="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in range(shards)]
    assert all(task.wait(timeout=600) == 0 for task in tasks), [t.stderr.read() for t in tasks]
    assert masks(out) == expected_masks(photos, out)
    # A failed task rerun: its slice's finished images are skipped, the missing one is redone.
    victim = masks(out)[0]
    victim.unlink()
    rerun = [subprocess.run(["bash", str(EXAMPLES / "slurm-array.sh"), str(photos), str(out)],
                            env=environment(shared_home, SLURM_ARRAY_TASK_ID=str(k)), capture_output=True, text=True)
             for k in range(shards)]
    assert all(r.returncode == 0 for r in rerun)
    assert victim.is_file() and masks(out) == expected_masks(photos, out)


def test_kubernetes_indexed_job_command(shared_home, photos, tmp_path):
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((EXAMPLES / "k8s-indexed-job.yaml").read_text())
    spec = job["spec"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert spec["completionMode"] == "Indexed" and int(env["SHARDS"]) == spec["completions"]
    assert env["DEEPLAB_OFFLINE"] == "1"
    data = tmp_path / "data"
    data.mkdir()
    photos.rename(data / "photos")
    command = [part.replace("/data", str(data)) for part in container["command"]]
    pods = [subprocess.Popen(command, env=environment(shared_home, JOB_COMPLETION_INDEX=str(k),
                                                      SHARDS=env["SHARDS"], DEEPLAB_OFFLINE="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for k in range(spec["completions"])]
    assert all(pod.wait(timeout=600) == 0 for pod in pods)
    assert masks(data / "masks") == expected_masks(data / "photos", data / "masks")


def test_offline_compute_node_without_the_model_says_what_to_run(photos, tmp_path):
    done = subprocess.run(["bash", str(EXAMPLES / "parallel.sh"), str(photos), str(tmp_path / "m"), "2"],
                          env=environment(tmp_path / "empty_home", DEEPLAB_OFFLINE="1"), capture_output=True, text=True)
    assert done.returncode != 0
    assert "deeplab models pull largefov-voc12" in done.stderr
