"""The one way jaxllm writes a file: to a temporary name beside it, renamed into place on success,
removed on failure, so an interrupted or failed write never leaves a half-written file. The result
has the mode `open` would give it: an existing file's, or 0666 / 0777 less the umask (mkstemp's
own 0600 / 0700 would hide run directories from the rest of a team). Also: `read_text`, the one
reader of user-given text files (config.load_config has its own: config may import only errors),
and `FileLock`."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0)  # read once, at import: os.umask is the only way to read it, and it sets it
os.umask(_UMASK)


def _mode(path: Path, default: int) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return default & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory; rename it to `path` when the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _mode(path, 0o666))
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; rename it to `path` when the block succeeds.
    `path` must not exist (a directory is never overwritten)."""
    import shutil

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{str(path)!r} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_text(path: str | Path, what: str, allowed: str = "a UTF-8 text file") -> str:
    """The UTF-8 text of the file `what` names (e.g. 'prompt file'); a one-line DataError for a
    missing, unreadable or undecodable one."""
    from jaxllm.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} {'is a directory' if path.is_dir() else 'does not exist'}; "
                        f"give {allowed}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start}); allowed: {allowed}") from None
    except OSError as e:
        raise DataError(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None


class FileLock:
    """An exclusive lock on `path` (flock), whose file names its owner (pid, host, start time) for
    whoever is refused. The kernel drops the lock when the owner exits, even by SIGKILL, so a lock
    file a dead process left behind is simply taken over; the owner deletes the file on release.
    (flock is per host on most network filesystems: multi-host runs lock from process 0 only.)"""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> tuple[bool, dict]:
        """(True, the previous owner's record or {}) when taken; (False, the owner's record) when held."""
        import fcntl  # (POSIX only)
        import socket
        import time

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            previous = _read_owner(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False, previous
            try:  # the previous owner may have deleted the file between our open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(owner).encode())
        self.fd = fd
        return True, previous

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}
