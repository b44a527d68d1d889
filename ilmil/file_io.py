"""Atomic file writes: every file a run writes goes through :func:`atomic_write`.

A file is written to a temporary file beside it, fsynced and renamed over the
target (``os.replace``), so a crash, a kill or a failing serializer leaves either
the previous version or the new one, never half of one. A failing serializer
leaves no temporary file; a killed process leaves its ``PATH.tmp.PID``, removed
when ``PATH`` is next written (a resumed stage writes its checkpoints' names again).
"""
import glob
import os

__all__ = ["atomic_write"]


def atomic_write(path, write, mode="wb"):
    """Call ``write(f)`` on a temporary file beside ``path`` opened in ``mode``
    (``"wb"`` or ``"w"``), fsync it and rename it to ``path``.

    Text is written as given (``newline=""``: no newline translation, as the csv
    module wants). When ``write`` raises, ``path`` is left as it was.
    """
    _remove_killed_writers_temporaries(path)
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


def _remove_killed_writers_temporaries(path):
    for tmp in glob.glob(f"{glob.escape(path)}.tmp.*"):
        pid = tmp.rsplit(".", 1)[1]
        if pid.isdigit() and not _process_exists(int(pid)):
            os.remove(tmp)


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
