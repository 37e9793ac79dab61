"""Install ``kernels/`` as ``routed_lora.kernels``; never as a top-level ``kernels`` (Hugging Face owns that name).

``kernels/`` has no ``__init__.py`` (kernels/README.md says why), so it is listed here by name and mapped with
``package_dir``; ``routed_lora/kernels`` is a symlink to it for a checkout on ``sys.path``.
"""

from setuptools import find_namespace_packages, find_packages, setup

packages = find_packages(include=["routed_lora", "routed_lora.*"], exclude=["routed_lora.kernels*"])
packages += ["routed_lora.kernels"] + [
    "routed_lora.kernels." + p for p in find_namespace_packages(where="kernels", exclude=["__pycache__*"])
]

setup(
    packages=packages,
    package_dir={"routed_lora.kernels": "kernels"},
    package_data={"routed_lora.kernels": ["README.md"]},
)
