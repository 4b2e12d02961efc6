"""The wheel ships the whole Hydra config tree: ``conf/`` (top level of the repository) is the data-only
package ``kd_lightning.conf`` of setup.py, and every ``conf/**/*.yaml`` must be matched by its
``package_data`` globs, so a new (nested) config group can never be silently left out of the wheel.
No wheel is built here (``scripts/check_wheel.sh`` builds and installs one); these checks take seconds."""

from __future__ import annotations

import glob
import os
import runpy
from pathlib import Path
from unittest import mock

import pytest
import setuptools
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
CONF_PACKAGE = "kd_lightning.conf"


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to ``setuptools.setup`` (run with ``setup`` replaced)."""
    captured: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.py's paths are relative to the repository root, as in a build
    try:
        with mock.patch.object(setuptools, "setup", lambda **kwargs: captured.update(kwargs)):
            runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
    return captured


def conf_yamls() -> set[str]:
    return {p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")}


def test_conf_is_shipped_as_kd_lightning_conf(setup_kwargs):
    assert CONF_PACKAGE in setup_kwargs["packages"]
    assert setup_kwargs["package_dir"][CONF_PACKAGE] == "conf"
    assert "kd_lightning" in setup_kwargs["packages"] and "kd_lightning.cli" in setup_kwargs["packages"]
    # the tree has nested groups (conf/llm/loss, conf/hydra/launcher): the check below must see them
    assert any(name.count("/") >= 2 for name in conf_yamls())


def test_every_conf_yaml_matches_the_package_data_globs(setup_kwargs):
    """Expanded as setuptools' build_py expands package_data: ``glob(src_dir/pattern, recursive=True)``."""
    src_dir = ROOT / setup_kwargs["package_dir"][CONF_PACKAGE]
    matched = {
        Path(path).relative_to(src_dir).as_posix()
        for pattern in setup_kwargs["package_data"][CONF_PACKAGE]
        for path in glob.glob(os.path.join(glob.escape(str(src_dir)), pattern), recursive=True)
        if Path(path).is_file()
    }
    missing = sorted(conf_yamls() - matched)
    assert not missing, f"conf/ files the wheel would leave out (fix package_data in setup.py): {missing}"


def test_setuptools_build_py_would_ship_every_conf_yaml(setup_kwargs, monkeypatch):
    """The file list setuptools itself computes for the wheel (build_py's data_files), without building."""
    monkeypatch.chdir(ROOT)
    dist = Distribution({"name": "kd-lightning", "script_name": "setup.py", **setup_kwargs})
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    shipped = {  # names are relative to the package's source dir, conf/
        Path(name).as_posix()
        for package, _src_dir, _build_dir, names in build_py.data_files
        if package == CONF_PACKAGE
        for name in names
    }
    missing = sorted(conf_yamls() - shipped)
    assert not missing, f"conf/ files the wheel would leave out: {missing}"


def test_config_dir_prefers_the_shipped_tree(tmp_path, monkeypatch):
    """``config_dir()``: ``kd_lightning/conf`` when it holds distill.yaml (a wheel), else ``<repo>/conf``."""
    from kd_lightning.cli import common

    assert Path(common.config_dir()) == CONF  # this checkout (or an editable install of it)
    package = tmp_path / "site-packages" / "kd_lightning"
    (package / "conf").mkdir(parents=True)
    monkeypatch.setattr(common, "_PACKAGE", package)
    assert Path(common.config_dir()) == tmp_path / "site-packages" / "conf"  # no distill.yaml: fallback
    (package / "conf" / "distill.yaml").write_text("seed: 0\n")
    assert Path(common.config_dir()) == package / "conf"
