"""Install ``kernels/`` as ``routed_lora.kernels``; never as a top-level ``kernels`` (Hugging Face owns that name)."""

from setuptools import find_packages, setup

packages = find_packages(include=["routed_lora", "routed_lora.*"])
packages += ["routed_lora.kernels"] + ["routed_lora.kernels." + p for p in find_packages(where="kernels")]

setup(
    packages=packages,
    package_dir={"routed_lora.kernels": "kernels"},
)
