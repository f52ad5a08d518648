"""Print a pip constraints file that pins every dependency of pyproject.toml to its lower bound.

    python .ci/lower_bounds.py cpu test > constraints.txt   # the base dependencies and these extras
    pip install -c constraints.txt ".[cpu,test]"

`name>=X` becomes `name==X`, and `name==X` stays; a requirement's environment marker is kept, so a bound
for old Pythons only applies there. Requirements without a lower bound are left to the resolver.
"""

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9._-]+)(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;\s*(.*))?$")


def lower_bound(requirement: str) -> str | None:
    """'numba>=0.61; python_version < "3.14"' -> 'numba==0.61 ; python_version < "3.14"'; None: unbounded."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise SystemExit(f"cannot read the requirement {requirement!r}")
    name, specifiers, marker = match.groups()
    for specifier in filter(None, (s.strip() for s in specifiers.split(","))):
        operator, version = re.match(r"(==|>=)?\s*(.*)", specifier).groups()
        if operator in ("==", ">="):
            return f"{name}=={version}" + (f" ; {marker}" if marker else "")
    return None


def main(extras: list[str]) -> None:
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"no extra {unknown[0]!r} in pyproject.toml")
    requirements = project["dependencies"] + [r for extra in extras for r in optional[extra]]
    for line in dict.fromkeys(filter(None, map(lower_bound, requirements))):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
