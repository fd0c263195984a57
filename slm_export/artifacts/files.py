"""Files that are either complete or absent: atomic writes, hashes, leftovers of killed writers.

Everything slm-export writes (checkpoints, token files, export files, manifests) goes
through ``atomic_write``: a temp file beside the target, fsynced, then renamed over it. A
process killed mid-write leaves only its own ``.<name>.tmp<pid>`` (or a staging folder);
the next writer of the same path removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temps(path: str | os.PathLike, tags: tuple[str, ...] = ("tmp",)) -> None:
    """Delete ``.<name>.<tag><pid>`` leftovers of ``path`` whose process is gone.

    A process killed mid-write (SIGKILL, power loss) leaves its temp file or staging folder
    behind under its own pid; the next writer of the same path removes it.
    """
    path = Path(path)
    for tag in tags:
        prefix = f".{path.name}.{tag}"
        for stale in path.parent.glob(f"{prefix}*"):
            pid = stale.name[len(prefix):]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename over ``path``.

    A crash (or a full disk) at any moment leaves either the old file or the new one,
    never a partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def staging_folder(target: str | os.PathLike):
    """A fresh hidden ``.<name>.tmp<pid>`` folder beside ``target``, removed on exit (after
    ``publish_folder`` has moved it into place, or after a failure)."""
    target = Path(target)
    recover_folder(target)
    remove_stale_temps(target)  # staging folders of exports that were killed
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_folder(staging: Path, target: Path) -> None:
    """Swap ``staging`` in as ``target``: the old folder is moved aside, the new one renamed
    into place, the old one removed. A kill between the two renames is undone by
    ``recover_folder``."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: str | os.PathLike) -> None:
    """Undo a ``publish_folder`` killed after moving the old folder aside and before the new
    one arrived (put the old one back), then remove stale moved-aside folders."""
    target = Path(target)
    if not target.exists():
        for old in sorted(target.parent.glob(f".{target.name}.old*")):
            os.replace(old, target)
            break
    remove_stale_temps(target, tags=("old",))
