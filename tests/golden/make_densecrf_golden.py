"""Writes tests/golden/densecrf.json: what pydensecrf computes for tests/golden_cases.py's programs of the
pydensecrf API (`densecrf_cases`), run on pydensecrf's own modules. Run where pydensecrf2 is installed:

    python tests/golden/make_densecrf_golden.py

tests/test_densecrf.py runs the same programs on deeplab_cli.densecrf and compares with the file (and, with
`-m crosscheck`, with pydensecrf itself).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: golden_cases

import golden_cases as cases  # noqa: E402


def main():
    import pydensecrf.densecrf as dcrf
    import pydensecrf.utils as utils

    records = {name: cases.densecrf_record(*program(dcrf, utils)) for name, program in cases.densecrf_cases().items()}
    cases.DENSECRF_FILE.write_text(json.dumps({"reference": "pydensecrf2 1.1", "cases": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
