"""The package's own face: ``kd_lightning.__version__`` is setup.cfg's version, every subpackage's ``__all__``
names what it offers (each name importable; where ``__all__`` lists the modules of a package imported module
by module, every module of the folder), and importing the package or those packages loads no torch."""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import kd_lightning

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kd_lightning"
#: Subpackages whose ``__init__`` has no ``__all__`` yet: the LM building blocks, being reorganised (issue #33).
NO_ALL = {"kd_lightning.llm"}
#: Packages imported module by module: their ``__init__`` imports nothing and ``__all__`` names the modules.
MODULE_LISTS = [
    "kd_lightning.cli",
    "kd_lightning.engine",
    "kd_lightning.engine.caching",
    "kd_lightning.recipes",
    "kd_lightning.reporting",
]
#: Packages of optional extras that a lazily imported name may need (``kd_lightning.data``'s image folders, text).
OPTIONAL = ("torchvision", "timm", "datasets", "transformers")


def subpackages() -> list[str]:
    return sorted(
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in PACKAGE.rglob("__init__.py")
        if path.parent != PACKAGE and "__pycache__" not in path.parts
    )


def test_version_is_the_one_in_setup_cfg() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["name"] == "kd-lightning"
    assert kd_lightning.__version__ == config["metadata"]["version"]
    assert "__version__" in kd_lightning.__all__


def test_version_of_a_source_tree_that_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delattr(kd_lightning, "__version__", raising=False)  # read again; restored afterwards
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert kd_lightning.__version__ == "0+unknown"
    with pytest.raises(AttributeError, match="no attribute 'version'"):
        kd_lightning.version  # noqa: B018 - only __version__ is offered


def test_every_subpackage_but_the_exempt_declares_all() -> None:
    found = subpackages()
    assert {"kd_lightning.losses", "kd_lightning.methods", "kd_lightning.methods.lm", *MODULE_LISTS} <= set(found)
    missing = [
        name
        for name in found
        if name not in NO_ALL and "__all__" not in (ROOT / name.replace(".", "/") / "__init__.py").read_text()
    ]
    assert not missing, f"subpackages whose __init__ has no __all__: {missing}"


@pytest.mark.parametrize("name", [name for name in subpackages() if name not in NO_ALL])
def test_every_name_in_all_is_importable(name: str) -> None:
    package = importlib.import_module(name)
    assert len(package.__all__) == len(set(package.__all__)), f"{name}.__all__ names something twice"
    for public in package.__all__:
        try:  # as ``from <package> import <public>``: an attribute (maybe lazy), else a submodule
            found = hasattr(package, public) or bool(importlib.import_module(f"{name}.{public}"))
        except ModuleNotFoundError as error:  # a lazy name of an extra that is not installed here
            if not any(extra in str(error) for extra in OPTIONAL):
                raise
            continue
        assert found and hasattr(package, public), f"`from {name} import {public}` fails"


@pytest.mark.parametrize("name", MODULE_LISTS)
def test_module_lists_name_every_module_of_their_folder(name: str) -> None:
    folder = ROOT / name.replace(".", "/")
    modules = {path.stem for path in folder.glob("*.py") if not path.name.startswith("_")}
    modules |= {path.parent.name for path in folder.glob("*/__init__.py")}
    assert sorted(importlib.import_module(name).__all__) == sorted(modules)


def test_importing_the_package_and_its_module_lists_loads_no_torch() -> None:
    code = (
        "import sys, kd_lightning\n"
        f"for name in {MODULE_LISTS!r}: __import__(name)\n"
        "assert kd_lightning.__version__\n"
        "print(sorted(m for m in ('torch', 'lightning', 'numpy', 'kd_lightning.losses') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
