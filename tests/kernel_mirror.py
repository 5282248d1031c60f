"""For the tests that mirror kernel code in Python: the kernel source, and a
check that the lines a mirror follows are still in it verbatim (a change
there fails the mirror's test first)."""

import pathlib

from cupy_lean import kernels as K

SRC = (pathlib.Path(K.kernel_dir()) / "lean_attention.cu").read_text()


def assert_in_kernel(lines):
    for line in lines:
        assert line in SRC, line
