"""Atomic file writes: every file a run writes goes through :func:`atomic_write`.

A file is written to a temporary file beside it, fsynced and renamed over the
target (``os.replace``), so a crash, a kill or a failing serializer leaves either
the previous version or the new one, never half of one, and no temporary file.
"""
import os

__all__ = ["atomic_write"]


def atomic_write(path, write, mode="wb"):
    """Call ``write(f)`` on a temporary file beside ``path`` opened in ``mode``
    (``"wb"`` or ``"w"``), fsync it and rename it to ``path``.

    Text is written as given (``newline=""``: no newline translation, as the csv
    module wants). When ``write`` raises, ``path`` is left as it was.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # The rename itself is durable only once the folder entry is on disk.
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
