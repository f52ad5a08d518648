"""Independent references for cross-checks: DeepLab-LargeFOV in PyTorch (CPU, float64), written from the
paper's Caffe prototxt, and pydensecrf. tests/golden/make_golden.py stores what they compute."""

import numpy as np

MEAN_BGR = (104.008, 116.669, 122.675)
# (name, out channels, kernel, dilation); padding keeps the size: dilation * (kernel // 2).
BLOCKS = [
    [("conv1_1", 64, 3, 1), ("conv1_2", 64, 3, 1), "max2"],
    [("conv2_1", 128, 3, 1), ("conv2_2", 128, 3, 1), "max2"],
    [("conv3_1", 256, 3, 1), ("conv3_2", 256, 3, 1), ("conv3_3", 256, 3, 1), "max2"],
    [("conv4_1", 512, 3, 1), ("conv4_2", 512, 3, 1), ("conv4_3", 512, 3, 1), "max1"],
    [("conv5_1", 512, 3, 2), ("conv5_2", 512, 3, 2), ("conv5_3", 512, 3, 2), "max1", "avg1"],
    [("fc6", 1024, 3, 12), ("fc7", 1024, 1, 1), ("fc8_voc12", 21, 1, 1)],
]


def torch_logits(weights, image_bgr_u8, pad_to=None):
    """(H, W, 3) uint8 BGR -> (C, h, w) float32 logits, computed in float64 for a tight reference."""
    import pytest

    torch = pytest.importorskip("torch")  # the test that needs the reference skips where torch is missing
    F = torch.nn.functional

    x = torch.from_numpy(image_bgr_u8.astype(np.float64) - np.array(MEAN_BGR))
    x = x.permute(2, 0, 1)[None]
    if pad_to is not None:
        x = F.pad(x, (0, max(0, pad_to[1] - x.shape[3]), 0, max(0, pad_to[0] - x.shape[2])))
    for block in BLOCKS:
        for item in block:
            if item == "max2":
                x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
            elif item == "max1":
                x = F.max_pool2d(x, 3, 1, 1, ceil_mode=True)
            elif item == "avg1":
                x = F.avg_pool2d(x, 3, 1, 1, ceil_mode=True, count_include_pad=True)
            else:
                name, _, k, d = item
                w, b = weights[name]
                x = F.conv2d(x, torch.from_numpy(w).double(), torch.from_numpy(b).double(),
                             padding=d * (k // 2), dilation=d)
                if name != "fc8_voc12":
                    x = F.relu(x)
    return x[0].numpy().astype(np.float32)


# The PyTorch port's network (wangleihitcs/DeepLab-V1-PyTorch, nets/vgg.py), module by module as its
# nn.Sequential numbers them: ("conv", in, out, kernel, dilation), "relu", ("max", stride), "avg", "drop".
PORT_FEATURES = [
    ("conv", 3, 64, 3, 1), "relu", ("conv", 64, 64, 3, 1), "relu", ("max", 2),
    ("conv", 64, 128, 3, 1), "relu", ("conv", 128, 128, 3, 1), "relu", ("max", 2),
    ("conv", 128, 256, 3, 1), "relu", ("conv", 256, 256, 3, 1), "relu", ("conv", 256, 256, 3, 1), "relu", ("max", 2),
    ("conv", 256, 512, 3, 1), "relu", ("conv", 512, 512, 3, 1), "relu", ("conv", 512, 512, 3, 1), "relu", ("max", 1),
    ("conv", 512, 512, 3, 2), "relu", ("conv", 512, 512, 3, 2), "relu", ("conv", 512, 512, 3, 2), "relu", ("max", 1),
    "avg", ("conv", 512, 1024, 3, 12), "relu", "drop", ("conv", 1024, 1024, 1, 1), "relu", "drop",
    ("conv", 1024, 21, 1, 1),
]
# Where each of the authors' layers sits in it (fc8 is features.38, as the port's training code says).
PORT_INDEX = {"conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
              "conv4_1": 17, "conv4_2": 19, "conv4_3": 21, "conv5_1": 24, "conv5_2": 26, "conv5_3": 28,
              "fc6": 32, "fc7": 35, "fc8_voc12": 38}


def port_state_dict(weights):
    """The port's checkpoint layout for `weights` (layer name -> (W, b)): a DataParallel state_dict,
    `module.features.N.weight|bias` -> array, in the port's module order."""
    state = {}
    for name, index in sorted(PORT_INDEX.items(), key=lambda item: item[1]):
        w, b = weights[name]
        state[f"module.features.{index}.weight"], state[f"module.features.{index}.bias"] = w, b
    return state


def port_logits(state_dict, image_bgr_u8, pad_to=None):
    """The port's network on (H, W, 3) uint8 BGR -> (C, h, w) float32 logits, in float64: its modules built
    as nets/vgg.py builds them (PyTorch pooling, rounding down), wrapped in DataParallel as its test() does,
    and the checkpoint loaded strictly, so its key layout is checked too. Padding, as the port's dataset
    pads, is with the mean before subtracting it."""
    import pytest

    torch = pytest.importorskip("torch")
    nn = torch.nn
    modules = []
    for item in PORT_FEATURES:
        if item == "relu":
            modules.append(nn.ReLU(True))
        elif item == "drop":
            modules.append(nn.Dropout2d(0.5))
        elif item == "avg":
            modules.append(nn.AvgPool2d(kernel_size=3, stride=1, padding=1))
        elif item[0] == "max":
            modules.append(nn.MaxPool2d(kernel_size=3, stride=item[1], padding=1))
        else:
            _, c_in, c_out, k, d = item
            modules.append(nn.Conv2d(c_in, c_out, kernel_size=k, padding=d * (k // 2), dilation=d))
    net = nn.Module()
    net.features = nn.Sequential(*modules)
    model = nn.DataParallel(net)
    model.load_state_dict({key: torch.from_numpy(np.asarray(value)) for key, value in state_dict.items()})
    model = model.double().eval()
    x = torch.from_numpy(image_bgr_u8.astype(np.float64) - np.array(MEAN_BGR)).permute(2, 0, 1)[None]
    if pad_to is not None:
        x = torch.nn.functional.pad(x, (0, max(0, pad_to[1] - x.shape[3]), 0, max(0, pad_to[0] - x.shape[2])))
    with torch.no_grad():
        return model.module.features(x)[0].numpy().astype(np.float32)


def training_net(weights, dilation_recorded=True):
    """The layers a real DeepLab-LargeFOV training snapshot carries, for tests/caffe_writer.py.

    Data, ReLU, pooling, dropout, interp and loss layers carry no blobs; every convolution carries
    weights then bias. `dilation_recorded=False` writes no hole/dilation field at all.
    """
    from caffe_writer import Conv, Layer

    # DeepLab's Caffe fork added its own V1 enum values beyond BVLC's for these types.
    layers = [Layer("data", "ImageSegData", tops=("data", "label"), v1_type=42)]
    bottom = "data"
    for block in BLOCKS:
        for item in block:
            if isinstance(item, str):
                name = {"max2": "pool", "max1": "pool", "avg1": "pool5a"}[item]
                layers.append(Layer(f"{name}_{len(layers)}" if item != "avg1" else "pool5a", "Pooling",
                                    (bottom,), (bottom,)))
                continue
            name, _, k, d = item
            w, b = weights[name]
            conv = Conv(num_output=w.shape[0], pad=d * (k // 2), kernel_size=k,
                        dilation=d if dilation_recorded and d > 1 else None)
            layers.append(Layer(name, "Convolution", (bottom,), (name,), blobs=(w, b), conv=conv))
            bottom = name
            if name != "fc8_voc12":
                layers.append(Layer(f"relu_{name}", "ReLU", (name,), (name,)))
            if name in ("fc6", "fc7"):
                layers.append(Layer(f"drop{name[2]}", "Dropout", (name,), (name,)))
    layers.append(Layer("fc8_interp", "Interp", ("fc8_voc12",), ("fc8_interp",), v1_type=43))
    layers.append(Layer("loss", "SoftmaxWithLoss", ("fc8_interp", "label"), ("loss",)))
    return layers


def caffe_interp(logits, height, width, zoom=8):
    """Caffe's Interp layer, written from its caffe_cpu_interp2 loop (vectorised over pixels): (C, h, w) ->
    (C, height, width) of the top-left crop of the ((h-1)*zoom+1, (w-1)*zoom+1) map."""
    _, h1, w1 = logits.shape
    h2, w2 = (h1 - 1) * zoom + 1, (w1 - 1) * zoom + 1
    rh = (h1 - 1) / (h2 - 1) if h2 > 1 else 0.0
    rw = (w1 - 1) / (w2 - 1) if w2 > 1 else 0.0
    y = np.arange(height) * rh
    x = np.arange(width) * rw
    y0, x0 = y.astype(int), x.astype(int)
    y1, x1 = y0 + (y0 < h1 - 1), x0 + (x0 < w1 - 1)
    ly, lx = (y - y0)[:, None], (x - x0)[None, :]
    f = logits.astype(np.float64)
    out = ((1 - ly) * ((1 - lx) * f[:, y0][:, :, x0] + lx * f[:, y0][:, :, x1])
           + ly * ((1 - lx) * f[:, y1][:, :, x0] + lx * f[:, y1][:, :, x1]))
    return out.astype(np.float32)


def deeplab_crf(image_bgr, probs, iters=10):
    """pydensecrf called as DeepLab-CRF-LargeFOV's CRF: w1 4, sigma_alpha 121, sigma_beta 5, w2 3,
    sigma_gamma 3, Potts, normalisation after filtering, on the RGB image."""
    import pytest

    dcrf = pytest.importorskip("pydensecrf.densecrf")

    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, None)).reshape(c, -1), np.float32))
    crf.addPairwiseGaussian(sxy=3, compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_AFTER)
    crf.addPairwiseBilateral(sxy=121, srgb=5, rgbim=np.ascontiguousarray(image_bgr[..., ::-1]), compat=4,
                             kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_AFTER)
    return np.asarray(crf.inference(iters)).reshape(c, h, w)


def pydensecrf_marginals(image_rgb, probs, params, normalization="after"):
    """pydensecrf's (C, H, W) float32 marginals under deeplab_cli's model: unary -log max(p, float32 tiny),
    Potts kernels, diagonal compatibilities. `params` has deeplab_cli.crf.CRFParams' fields;
    `normalization` is "after" (DeepLab's) or "symmetric" (pydensecrf's default)."""
    import pytest

    dcrf = pytest.importorskip("pydensecrf.densecrf")
    from deeplab_cli.crf.meanfield import log_probs

    norm = {"after": dcrf.NORMALIZE_AFTER, "symmetric": dcrf.NORMALIZE_SYMMETRIC}[normalization]
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(-log_probs(probs))  # the unary is an input: deeplab_cli's log of the probabilities
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w, kernel=dcrf.DIAG_KERNEL, normalization=norm)
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=np.ascontiguousarray(image_rgb),
                             compat=params.bi_w, kernel=dcrf.DIAG_KERNEL, normalization=norm)
    return np.asarray(crf.inference(params.iters), np.float32).reshape(c, h, w)


def bilinear_half_pixel(probs, height, width):
    """(C, h, w) -> (C, height, width) float64: bilinear with half-pixel centres and clamped edges (OpenCV's
    INTER_LINEAR and PyTorch's align_corners=False geometry), written from that definition."""
    def axis(n_in, n_out):
        position = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(position).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, position - lo
    (y0, y1, fy), (x0, x1, fx) = axis(probs.shape[1], height), axis(probs.shape[2], width)
    p = probs.astype(np.float64)
    top = p[:, y0][:, :, x0] * (1 - fx) + p[:, y0][:, :, x1] * fx
    bottom = p[:, y1][:, :, x0] * (1 - fx) + p[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def pydensecrf_on_scores(image_bgr, kind, scores, gt_prob=0.7, ignore=None, n_labels=21):
    """What pydensecrf gives with DeepLab's settings on another model's scores: (H, W) uint8 labels.

    probs: brought to the image's size by `bilinear_half_pixel`, unary -log max(p, float32 tiny) as
    DeepLab's CRF, with deeplab_cli's log, as `pydensecrf_marginals` (numpy's float32 log differs from
    glibc's logf by an ulp here and there); labels: pydensecrf's own `unary_from_labels` (zero_unsure=False), pixels of the
    `ignore` label given the uniform unary -log(1 / n_labels)."""
    import pytest

    dcrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_labels

    h, w = image_bgr.shape[:2]
    if kind == "probs":
        from deeplab_cli.crf.meanfield import log_probs

        unary = -log_probs(bilinear_half_pixel(scores, h, w).astype(np.float32))
    else:
        unknown = scores == ignore
        unary = unary_from_labels(np.where(unknown, 0, scores), n_labels, gt_prob, zero_unsure=False)
        unary[:, unknown.reshape(-1)] = -np.log(1.0 / n_labels)
    crf = dcrf.DenseCRF2D(w, h, len(unary))
    crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
    crf.addPairwiseGaussian(sxy=3, compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_AFTER)
    crf.addPairwiseBilateral(sxy=121, srgb=5, rgbim=np.ascontiguousarray(image_bgr[..., ::-1]), compat=4,
                             kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_AFTER)
    return np.asarray(crf.inference(10)).reshape(len(unary), h, w).argmax(0).astype(np.uint8)


def deeplab_labels(weights, image_bgr, crf=True, pad_to=None):
    """DeepLab-(CRF-)LargeFOV end to end, independently of deeplab_cli: (H, W) uint8 labels."""
    h, w = image_bgr.shape[:2]
    scores = caffe_interp(torch_logits(weights, image_bgr, pad_to), h, w)
    e = np.exp(scores - scores.max(0, keepdims=True))
    probs = (e / e.sum(0, keepdims=True)).astype(np.float32)
    if crf:
        probs = deeplab_crf(image_bgr, probs)
    return probs.argmax(0).astype(np.uint8)
