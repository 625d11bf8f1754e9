"""The one compiled part of the package: the fan-out loops (gateway/core/_fastpath.c). Everything else is in
pyproject.toml. `optional`: without a C compiler or Python's headers the install still succeeds and the
gateway uses the same loops in Python (gateway/core/fastpath.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("gateway.core._fastpath", ["gateway/core/_fastpath.c"], optional=True,
                  extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                      "-Wno-missing-field-initializers"]),
    ],
)
