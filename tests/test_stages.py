"""The per-image stages: what a network session is asked for."""

import pytest

from deeplab_cli.run import stages
from deeplab_cli.io.inputs import collect


@pytest.mark.parametrize("crf,formats,max_size,expected", [
    (None, ("index",), None, ("labels",)),
    (None, ("index",), 20, ("probs",)),  # scaled down: probabilities are needed to come back up
    (None, ("index", "logits"), None, ("logits", "labels")),
    (stages.CRFParams(), ("index",), None, ("probs",)),
])
def test_only_what_is_needed_comes_back(folder, probs_session, session, tmp_path, crf, formats, max_size, expected):
    settings = stages.Settings(out=tmp_path, formats=formats, crf=crf, max_size=max_size)
    item = stages.load_job(collect([str(folder / "0.png")])[0], settings)
    assert stages._wanted(probs_session, settings, [item]) == expected
    assert stages._wanted(session, settings, [item]) == ("logits",)
