"""The one packaging fact pyproject.toml cannot state: configs/ stays at the repository root,
where people read and edit it, and ships inside the package as lmjax/configs, so that
`pip install .` users run the same config files (lmjax/config.py's configs_dir finds either)."""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["lmjax*"]), "lmjax.configs"],
      package_dir={"lmjax.configs": "configs"})
