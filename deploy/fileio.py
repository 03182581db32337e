"""Atomic file writes and content hashes, used by every stage that writes outputs.

A crash (Ctrl-C, kill -9, power loss on a clinic device) must never leave a half-written file under
the final name: we write to a temporary file in the same directory, fsync, then rename. The temporary
name carries the writer's process id and host, so the next write of the same file removes what a
killed writer left behind (a checkpoint's can be many MB) without touching a live writer's file.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX (Linux, Jetson, macOS); without it `locked` does not serialise, writes stay atomic
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then atomically move the temporary file to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    writer = f"{os.getpid()}-{_WRITER_HOST}"  # at call time: a forked child is another writer
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)  # the rename itself survives a power loss only once the dir is synced
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


_WRITER_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def remove_orphans(path: str | Path) -> list[Path]:
    """Delete temporary files of `path` left by writers on this host that no longer run; returns them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*-{_WRITER_HOST}.*.tmp"):
        pid_text = tmp.name[len(path.name) + 2:].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform/filesystem; the data itself is already synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`'s hidden lock file (`.NAME.lock` next to it): serialises a
    read-modify-write of a file that several processes update (parallel teachers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
