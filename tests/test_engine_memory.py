"""engine.reuse_freed_memory: on glibc, CPU training serves large blocks from the heap and keeps freed ones."""

import ctypes
import subprocess
import sys

import pytest

GLIBC = hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not GLIBC, reason="glibc >= 2.33 (mallinfo2) only: other C libraries are left as they are")
def test_large_blocks_come_from_the_heap_once_training_starts():
    script = """
import ctypes, torch
from clipadapt.engine import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_for(nbytes):  # bytes in mmapped blocks while a tensor of nbytes is alive
    block = torch.empty(nbytes // 4)
    return libc.mallinfo2().hblkhd

big = 64 << 20
before = mapped_for(big)
reuse_freed_memory()
print(before >= big, mapped_for(big) < big)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]  # mapped afresh before, from the heap after
