"""Only the package list lives here (everything else is in pyproject.toml): setuptools cannot
combine automatic discovery with the ``package-dir`` mapping that installs the top-level
``kernels/`` and ``csrc/`` as ``vllm_glimpse.kernels`` and ``vllm_glimpse.csrc``."""

from setuptools import find_packages, setup


def _packages() -> list[str]:
    ours = find_packages(include=["vllm_glimpse", "vllm_glimpse.*"])
    for directory, package in (("kernels", "vllm_glimpse.kernels"), ("csrc", "vllm_glimpse.csrc")):
        ours.append(package)
        ours += [f"{package}.{sub}" for sub in find_packages(where=directory)]
    return ours


setup(packages=_packages())
