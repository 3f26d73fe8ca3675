"""Running a command with its stderr on a pseudo-terminal, as a user's shell gives it (progress bars are for TTYs)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path


def run_on_a_terminal(command: list[str], env: dict, cwd: Path) -> str:
    """The command's stderr, written to a pseudo-terminal 120 columns wide; the command must succeed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    output = bytearray()
    while True:  # read as it comes: a full pty buffer would block the child
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0, output.decode(errors="replace")[-2000:]
    return output.decode(errors="replace")
