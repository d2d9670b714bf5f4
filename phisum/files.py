"""Writing what users keep without ever leaving a half-written or silently replaced copy."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(out_dir, overwrite: bool, flag: str = "--out", overwrite_flag: str = "--overwrite") -> None:
    """Refuse, before any work is done, an output that is a file or a folder already holding
    something (unless `overwrite`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{flag} {out_dir} is a file; give a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{flag} {out_dir} already holds files; choose a new folder or pass {overwrite_flag}")


@contextmanager
def replace_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; when the block ends without an error it becomes
    `target` (an old one is moved aside and removed), otherwise it is removed. A reader never
    sees a half-written folder, and a killed write leaves the old one in place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
