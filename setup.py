"""Package layout that setup.cfg cannot express: the Hydra config tree ``conf/`` (kept at the repository
top level) ships inside the wheel as ``kd_lightning/conf/**``. Everything else is in setup.cfg.

An installed wheel reads ``kd_lightning/conf``; a checkout or an editable install reads ``<repo>/conf``
(``kd_lightning.cli.common.config_dir``). tests/test_packaging.py checks that every ``conf/**/*.yaml``
is matched by ``PACKAGE_DATA``.
"""

from setuptools import find_packages, setup

#: The config tree as a data-only package (no ``__init__.py``), mapped to the top-level ``conf/``.
CONF_PACKAGE = "kd_lightning.conf"
PACKAGE_DIR = {CONF_PACKAGE: "conf"}
#: ``**`` matches every subdirectory at any depth (conf/llm/loss, conf/hydra/launcher, ...).
PACKAGE_DATA = {CONF_PACKAGE: ["*.yaml", "**/*.yaml"]}

setup(
    packages=[*find_packages(include=["kd_lightning", "kd_lightning.*"]), CONF_PACKAGE],
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
)
