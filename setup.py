"""Build script. The compiled kernels (``csrc/``) are optional: without them the package runs on
its pure-PyTorch backend. Build switches are environment variables, documented in README.md."""

from setuptools import setup

setup()
