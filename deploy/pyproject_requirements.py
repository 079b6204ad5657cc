"""Prints the project's requirements (and those of the extras named) one per
line, from pyproject.toml alone, so an image installs its dependencies in a
layer that code changes do not invalidate.

Example:
    python pyproject_requirements.py cuda > requirements.txt
    pip install -c constraints.txt -r requirements.txt
"""

import pathlib
import sys
import tomllib


def requirements(pyproject: pathlib.Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = set(extras) - set(optional)
    if unknown:
        raise SystemExit(f"unknown extras {sorted(unknown)}; pyproject.toml has "
                         f"{sorted(optional)}")
    return list(project["dependencies"]) + [r for e in extras for r in optional[e]]


if __name__ == "__main__":
    here = pathlib.Path.cwd() / "pyproject.toml"
    print("\n".join(requirements(here, [a for a in sys.argv[1:] if a])))
