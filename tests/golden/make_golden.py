"""Writes tests/golden/ from the independent references: pydensecrf's marginals (crf.json), the PyTorch
network's logits and end-to-end labels and the PyTorch port's logits (network.json, network.npz), and
pydensecrf's labels on other models' scores (scores.npz), on tests/golden_cases.py's inputs.

Run where the crosscheck extra is installed (torch, pydensecrf2), from anywhere:

    python tests/golden/make_golden.py

tests/test_golden.py's crosscheck tests recompute every record there and compare it with the files.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: golden_cases, reference, conftest

import golden_cases as cases  # noqa: E402
from deeplab_cli.crf import CRFParams  # noqa: E402
from deeplab_cli.synthetic import random_weights  # noqa: E402
from reference import (deeplab_labels, port_logits, port_state_dict, pydensecrf_marginals,  # noqa: E402
                       pydensecrf_on_scores, torch_logits)


def crf_record(make):
    """crf.json's record of one case, from pydensecrf; the symmetric case also says how far it is from
    the normalisation after filtering."""
    image, probs, changes, normalization = make()
    q = pydensecrf_marginals(image, probs, CRFParams(**changes), normalization)
    record = cases.crf_record(image, probs, q)
    if normalization != "after":
        after = pydensecrf_marginals(image, probs, CRFParams(**changes))
        record["max_abs_dq_from_after"] = round(float(np.abs(q - after).max()), 3)
    return record


def network_golden(weights):
    """(network.json's dict, network.npz's arrays): logits per network case, labels per labels case."""
    meta = {"weights": cases.sha256(*[a for pair in weights.values() for a in pair]), "images": {}}
    arrays = {}
    for name, (image, pad_to) in cases.network_cases().items():
        step = cases.SUBSAMPLE.get(name, 1)
        arrays[name] = torch_logits(weights, image, pad_to)[:, ::step, ::step].copy()
        meta["images"][name] = cases.sha256(image)
    for name, (image, pad_to) in cases.port_cases().items():
        arrays[name] = port_logits(port_state_dict(weights), image, pad_to)
        meta["images"][name] = cases.sha256(image)
    with tempfile.TemporaryDirectory() as folder:
        for name, (image, crf, pad_to) in cases.label_cases(Path(folder)).items():
            arrays[name] = deeplab_labels(weights, image, crf=crf, pad_to=pad_to)
            meta["images"][name] = cases.sha256(image)
    return meta, arrays


def scores_golden():
    """scores.npz: per score case, its inputs' SHA-256 and pydensecrf's labels."""
    arrays = {}
    for name, (image, kind, scores, options) in cases.score_cases().items():
        settings = dict(zip(options[::2], options[1::2]))
        arrays[f"{name}/inputs"] = np.array(cases.sha256(image, scores))
        arrays[f"{name}/labels"] = pydensecrf_on_scores(
            image, kind, scores, gt_prob=float(settings.get("--gt-prob", 0.7)),
            ignore=int(settings["--ignore-label"]) if "--ignore-label" in settings else None,
            n_labels=int(settings.get("--classes", 21)))
    return arrays


def main():
    crf = {"reference": "pydensecrf2 1.1", "cases": {name: crf_record(make)
                                                    for name, make in cases.crf_cases().items()}}
    cases.CRF_FILE.write_text(json.dumps(crf, indent=1) + "\n")
    meta, arrays = network_golden(random_weights(seed=0))
    meta["reference"] = ("tests/reference.py: PyTorch 2.13.0 CPU, float64; labels with pydensecrf2 1.1; "
                         "port: cases from the port's own nn.Sequential")
    cases.NETWORK_FILE.write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(cases.NETWORK_ARRAYS, **arrays)
    np.savez_compressed(cases.SCORES_FILE, **scores_golden())


if __name__ == "__main__":
    main()
