"""The unprivileged VMM user as tests of file permissions need it: what it may read, and a
directory it may enter."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

VMM_USER = "metald-vmm"


def vmm_user_reads(path: Path) -> bool:
    """True if the unprivileged VMM user can read the file (setpriv drops to it, as VMMs run)."""
    argv = ["setpriv", "--reuid", VMM_USER, "--regid", VMM_USER, "--clear-groups", "cat", str(path)]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def dir_the_vmm_user_enters(prefix: str) -> Path:
    """A new 0755 directory (pytest's tmp dirs are 0700 themselves); the caller removes it. Skips
    the test unless it runs as root with setpriv and the VMM user exists."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    try:
        pwd.getpwnam(VMM_USER)
    except KeyError:
        pytest.skip(f"no user {VMM_USER}")
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
