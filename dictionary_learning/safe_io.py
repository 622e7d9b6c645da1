"""Files that survive crashes and say when they are damaged: atomic writes, checksums, folder locks.

Every file the library writes goes through `atomic_write`: a temporary file in the same folder
(named after the writer's pid, so a later writer can tell a dead writer's leftovers), flushed to
disk, then renamed over the target. A kill at any instant leaves either the old file or the new
one, never half of one. Files get the permissions the umask allows, like any other program's.

`FolderLock` makes one process the only writer of a run or cache folder: a second one fails at
once with the owner's host and pid, and the lock of a process that died on this host is taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = ".dictionary_learning.lock"
_TMP_PATTERN = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]+$")
_CHUNK = 1 << 22


class FolderLockedError(RuntimeError):
    """Another live process writes to this folder; the message names it and the fix."""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created file gets under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a folder
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` writes before the rename: hidden, in the same folder, naming this pid."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write(
    path: str | Path, write: Callable[[str], None], before_rename: Callable[[str], None] | None = None
) -> str:
    """Call `write(tmp)` to write a temporary file, flush it to disk, rename it over `path`, and
    return its sha256 (`before_rename(sha256)` runs just before the rename: to record it). The
    temporary file is removed if anything fails (a full disk, an error, Ctrl-C); only a kill -9
    leaves it, and the next writer of the folder removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(str(tmp))
        digest = sha256_file(tmp, fsync=True)
        os.chmod(tmp, file_mode())
        if before_rename is not None:
            before_rename(digest)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def atomic_write_json(obj: Any, path: str | Path) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=4, allow_nan=False)

    return atomic_write(path, write)


def sha256_file(path: str | Path, fsync: bool = False) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks); with `fsync`, also flush it to disk."""
    digest = hashlib.sha256()
    with open(path, "rb" if not fsync else "rb+") as fh:
        if fsync:
            os.fsync(fh.fileno())
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remove_dead_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files of writers that no longer run (kill -9 during a write), below
    `folder`; returns what was removed. Temporaries of live processes on this host are kept."""
    removed = []
    for path in Path(folder).rglob(".*.tmp-*"):
        match = _TMP_PATTERN.match(path.name)
        if match and path.is_file() and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d temporary files of interrupted writes under %s", len(removed), folder)
    return removed


# ---------------------------------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class FolderLock:
    """The one-writer lock of a folder: an exclusive `flock` on `LOCK_FILE`, which holds the owner's
    host, pid and start time for the error message.

    The operating system drops the lock when its process ends in any way (kill -9 included), so a
    lock left by a process that died is taken over, with a warning naming the dead owner. A live
    owner makes `acquire` raise `FolderLockedError` naming the folder, the owner and what to do.
    Released (the file removed) on `release` or when the `with` block ends.
    """

    def __init__(self, folder: str | Path, purpose: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None
        self._created_folder = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                _flock(fd)
            except BlockingIOError:
                os.close(fd)
                raise FolderLockedError(self._locked_message()) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the owner released (removed) it between our open and lock: take the new file
        previous = _read_owner(fd)
        if previous:
            logger.warning(
                "%s: taking over the lock of a %s that ended without releasing it (pid %s on %s, since %s)",
                self.folder,
                previous.get("purpose", "run"),
                previous.get("pid", "?"),
                previous.get("host", "?"),
                previous.get("since", "?"),
            )
        record = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "purpose": self.purpose, "since": _now()}
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self._fd = fd
        return self

    def _locked_message(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        host = owner.get("host", "?")
        where = "this host" if host == socket.gethostname() else f"host {host}"
        return (
            f"{self.folder} is being written by another {owner.get('purpose', 'process')} "
            f"(pid {owner.get('pid', '?')} on {where}, since {owner.get('since', '?')}): one writer per folder. "
            f"Use another folder, or wait for that process to end"
        )

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting opener then sees a new file
            os.close(self._fd)
            self._fd = None
            if self._created_folder:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # made only for the lock and left empty: leave no trace

    def __enter__(self) -> FolderLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _flock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the lock file only records the owner
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
