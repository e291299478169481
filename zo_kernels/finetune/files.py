"""The files a zo-finetune run keeps: written whole or not at all, in a directory one live run owns.

Every file (results.json, curves.png, checkpoint.pt, weights, a merged table) goes through
`write_atomic`: it is written to FILE.tmp.<pid> beside FILE, flushed and fsync'ed, then renamed
over FILE (os.replace is atomic on POSIX), so a full disk, a signal or a crash at any instant leaves
either the previous FILE or the new one, never a torn file.  A failed write removes its temporary
file and raises one FinetuneError line naming the file and the cause.

`RunLock` makes an output directory one run's at a time: an flock on DIR/.zo-finetune.lock, which
names the holder's PID.  The kernel drops the lock when its process dies (kill -9 included), so a
lock is never stale; a second run on the directory is refused with the holder's PID.  Temporary
files are removed only when the PID in their name is no longer alive.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
from typing import Callable, Optional

from .errors import FinetuneError

LOCK = ".zo-finetune.lock"
_TMP = re.compile(r"\.tmp\.(\d+)$")


def temp_name(final: str) -> str:
    return f"{final}.tmp.{os.getpid()}"


def _remove(p: str) -> None:
    try:
        os.remove(p)
    except OSError:
        pass


def _fsync_dir(final: str) -> None:
    """Make the rename itself durable (best effort: some file systems refuse fsync on a directory)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _cause(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e).splitlines()[0]


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`: torch.save's zip writer replaces a failed write's OSError by its own
    RuntimeError ("unexpected pos ...") when it closes the archive."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def write_atomic(final: str, write: Callable, mode: str = "wb") -> None:
    """Call write(f) on a temporary file beside `final`, then rename it over `final`.

    On any failure the temporary file is removed and `final` is left as it was; an OSError (disk
    full, permission, read-only file system) becomes one FinetuneError line."""
    tmp = temp_name(final)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:      # KeyboardInterrupt too: no half-written temporary file stays
        _remove(tmp)
        os_error = _os_error(e)
        if os_error is not None:
            kept = "the previous file is unchanged" if os.path.exists(final) else "nothing was written"
            raise FinetuneError(f"cannot write {final}: {_cause(os_error)} ({kept})") from None
        raise
    _fsync_dir(final)


def write_bytes(final: str, data: bytes) -> None:
    write_atomic(final, lambda f: f.write(data))


def write_json(final: str, obj) -> None:
    # Serialised first: an unserialisable value fails before the temporary file exists.
    write_bytes(final, (json.dumps(obj, indent=2, default=float) + "\n").encode())


def torch_save(final: str, obj) -> None:
    import torch

    write_atomic(final, lambda f: torch.save(obj, f))


def save_figure(fig, final: str, **kw) -> None:
    fmt = os.path.splitext(final)[1].lstrip(".") or "png"
    write_atomic(final, lambda f: fig.savefig(f, format=fmt, **kw))


# ------------------------------------------------------------------ the output directory
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_dead_temps(out_dir: str) -> None:
    """Temporary files (NAME.tmp.<pid>) left by processes that no longer run; a live process's stay."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return
    for n in names:
        m = _TMP.search(n)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            _remove(os.path.join(out_dir, n))


def check_writable(out_dir: str, flag: str = "--out") -> None:
    """Create `out_dir` if needed and refuse one this process cannot write, before any work starts."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FinetuneError(f"{flag} {out_dir}: exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"{flag} {out_dir}: cannot create directory ({_cause(e)})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise FinetuneError(f"{flag} {out_dir}: directory is not writable (read-only or permission denied)")


class RunLock:
    """An exclusive, non-blocking lock on an output directory for the life of this process's run.

    `with RunLock(dir):` or acquire()/release().  A directory locked by a live run is refused with
    that run's PID; the lock file is removed on release."""

    def __init__(self, out_dir: str, flag: str = "--out"):
        self.out_dir, self.flag = out_dir, flag
        self.path = os.path.join(out_dir, LOCK)
        self._fd: Optional[int] = None

    def _holder(self) -> str:
        try:
            with open(self.path) as f:
                text = f.read().split()
        except OSError:
            text = []
        return f"PID {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "") if text else "unknown PID"

    def acquire(self) -> "RunLock":
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise FinetuneError(f"{self.flag} {self.out_dir}: cannot create the lock file {LOCK} "
                                    f"({_cause(e)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FinetuneError(f"{self.flag} {self.out_dir} is in use by another zo-finetune run "
                                    f"({self._holder()}, lock file {self.path}); wait for it to end or "
                                    f"choose another {self.flag}") from None
            # The file may have been unlinked by its previous holder between our open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            except OSError as e:
                os.close(fd)
                raise FinetuneError(f"{self.flag} {self.out_dir}: cannot write the lock file {LOCK} "
                                    f"({_cause(e)})") from None
            self._fd = fd
            return self
        raise FinetuneError(f"{self.flag} {self.out_dir}: could not take the lock {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        _remove(self.path)
        os.close(self._fd)          # closing drops the flock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def open_run_dir(out_dir: str, flag: str = "--out") -> RunLock:
    """Everything a run does to its directory before any work: check it is writable, take the lock,
    remove dead processes' temporary files.  Returns the held lock (release it at the end)."""
    check_writable(out_dir, flag)
    lock = RunLock(out_dir, flag).acquire()
    remove_dead_temps(out_dir)
    return lock
