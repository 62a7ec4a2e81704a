"""`pip install .` ships every package: pyproject.toml lists the packages by hand (the top-level `kernels/` and
`patterns/` folders install as `liger_compile.kernels` / `liger_compile.patterns`), so a subpackage left off the list
would work in a source checkout and be missing from an installed wheel."""
import os

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_package_folder_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        top = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, top)
                found.add(package if rel == "." else ".".join([package, *rel.split(os.sep)]))
    assert found, "no package folder found"
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
