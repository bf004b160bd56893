"""The bytes of a run folder's files (docs/spec.md §7, crmn/LOGS.md; what they mean to a run:
crmn.runstate), its lock, and what the report reads. A kill or a full disk never loses what was
there: ``log.jsonl`` is appended and fsynced line by line, every other file replaced atomically."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

from crmn.errors import DataError, RunError

CONFIG = "config.json"
LOG = "log.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.h5"
BEST = "best.h5"
CAPPED = "capped.h5"  # the state where --epochs-cap first cut a stage short
CAPPED_BEST = "capped.best.h5"  # and the best model then
LOCK = ".lock"  # held by the process that trains in the folder, removed at its end
PROC_LOCKS = "/proc/locks"  # the kernel's table of the locks held on this machine
#: set by a launcher for each run: how many runs share its GPU (--runs-per-gpu), for config.json
PACKING_ENV = "CRMN_RUNS_PER_GPU"
#: fields every log line carries (crmn/LOGS.md)
LOG_FIELDS = ("phase", "epoch", "stage", "lr", "train_loss", "train_acc", "eval_split",
              "eval_loss", "eval_acc", "seconds", "images_per_s", "decision", "time")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (where the file system allows it)."""
    with contextlib.suppress(OSError):  # some file systems refuse; the rename is atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_umask() -> int:
    old = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(old)
    return old


#: the mode ``open(path, "w")`` gives; mkstemp's 0600 would hide results from other users
FILE_MODE = 0o666 & ~_read_umask()


def replace_file(path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically; OSError leaves ``path`` as it was."""
    commit_temp(write_temp(path, data), path)


def write_temp(path, data: bytes) -> Path:
    """``data`` fsynced in ``.NAME.XXXX.tmp`` beside ``path``, for :func:`commit_temp`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it current
    except BaseException:
        _remove_quietly(tmp)
        raise
    return Path(tmp)


def commit_temp(tmp, path) -> None:
    """Rename ``tmp`` over ``path`` durably; on failure ``tmp`` is removed."""
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(Path(path).parent)


def link_over(src, dst) -> None:
    """Make ``dst`` a second name of ``src``'s bytes atomically (a hard link, else a copy)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    _remove_quietly(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network and FAT file systems)
        replace_file(dst, src.read_bytes())
        return
    commit_temp(tmp, dst)


def write_bytes_atomic(path, data: bytes) -> None:
    """:func:`replace_file`, raising a RunError that names the file."""
    try:
        replace_file(path, data)
    except OSError as e:
        raise RunError(f"{path}: could not write ({e.strerror or e})") from e


def _remove_quietly(path) -> None:
    with contextlib.suppress(OSError):  # the error to report is the write's, not this one
        os.unlink(path)


@contextlib.contextmanager
def hold(run_dir) -> Iterator[None]:
    """Hold ``run_dir`` (docs/spec.md §8): a ``flock`` on ``.lock``, which holds our PID; the
    kernel drops it when the process dies (kill -9 too)."""
    path = Path(run_dir) / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise RunError(f"{run_dir}: cannot take the run's lock {LOCK} "
                           f"({exc.strerror or exc}); nothing here was changed") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"{run_dir}: in use by another run (process {holder}, lock "
                            f"{LOCK}); wait for it to end or stop it; nothing here was "
                            "changed") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)  # the previous holder removed the file as we opened it: try again
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        _remove_quietly(path)
        os.close(fd)


def flock_holder(path) -> Optional[int]:
    """The PID holding a ``flock`` on ``path`` on this machine (-1: not named), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # no lock file: released (hold() removes it) or never taken
    try:
        table = Path(PROC_LOCKS).read_text()
    except OSError:  # no /proc: a shared lock is tried and released at once
        return _probe_lock(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        words = line.split()
        # "1: FLOCK  ADVISORY  WRITE 5537 fe:00:2146481 0 EOF"; waiters carry a "->"
        if len(words) >= 6 and words[1] == "FLOCK" and words[5] == want:
            return int(words[4]) if words[4].isdigit() and words[4] != "0" else -1
    return None


def _probe_lock(path) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read(32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:  # gone, or a file system without flock: no run could hold it either
        return None
    return None


def write_json(path, obj) -> None:
    """``obj`` as indented JSON in ``path``, atomically (config.json, summary.json)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def read_json(path) -> dict:
    """Load a JSON file; a missing or malformed file is a :class:`DataError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode())
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; a run folder holds it from its first epoch: run the "
                        "command again (--resume continues a run)") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); restore it, or delete the run folder "
                        "and run the command again") from e


def append_entry(path, entry: Dict) -> None:
    """Append one epoch's line (every field of :data:`LOG_FIELDS`) to ``log.jsonl``, durably."""
    missing = [k for k in LOG_FIELDS if k not in entry]
    if missing:
        raise ValueError(f"log entry lacks {missing}")
    try:
        with open(path, "ab") as f:
            f.write((json.dumps(entry, allow_nan=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunError(f"{path}: could not append the epoch's log line "
                        f"({e.strerror or e}); free disk space, then run the same command "
                        "with --resume") from e


def read_log(path, events: bool = False) -> List[Dict]:
    """``log.jsonl``'s epoch lines (``events``: and event lines); a cut-off last one dropped."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    *complete, fragment = text.split("\n")  # fragment: text after the last newline
    entries = []
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError as e:
            if i == len(complete) - 1 and not fragment.strip():
                break  # a cut-off last line that happens to end in a newline byte
            raise DataError(f"{path}: line {i + 1} is not valid JSON ({e}); delete that line "
                            "and the ones after it, then run with --resume") from e
    return entries if events else [e for e in entries if "event" not in e]


def rewrite_log(path, entries: Iterable[Dict]) -> None:
    """Replace ``log.jsonl`` by ``entries`` atomically (resume drops epochs it will redo)."""
    write_bytes_atomic(path, "".join(json.dumps(e, allow_nan=False) + "\n"
                                     for e in entries).encode())


def is_done(summary: Optional[Dict]) -> bool:
    """Whether ``summary`` (summary.json's content or None) is a finished run's."""
    return summary is not None and summary.get("status") == "done"


def read_summary(run_dir) -> Optional[Dict]:
    """summary.json of ``run_dir``, None without one."""
    path = Path(run_dir) / SUMMARY
    return read_json(path) if path.exists() else None


def finished_summary(run_dir) -> Optional[Dict]:
    """summary.json of ``run_dir`` when the run there is finished, else None."""
    summary = read_summary(run_dir)
    return summary if is_done(summary) else None


@dataclass
class RunRecord:
    """What a run directory holds, as the report reads it."""
    path: Path
    config: Dict  # config.json
    log: List[Dict] = field(default_factory=list)  # log.jsonl lines
    summary: Optional[Dict] = None  # summary.json, None while unfinished

    @property
    def finished(self) -> bool:
        return is_done(self.summary)

    def phase(self, name: str) -> List[Dict]:
        return [e for e in self.log if e.get("phase") == name]


def compile_note(log: Iterable[Dict]) -> str:
    """The compilations a run's log records, e.g. ``196 s miss, 3 s hit``."""
    items = []
    for e in log:
        seconds = e.get("compile_seconds")
        if isinstance(seconds, (int, float)) and seconds >= 0.05:
            state = e.get("cache_outcome", e.get("compile_cache"))  # the old name
            items.append(f"{seconds:.0f} s" + (f" {state}" if state else ""))
    return ", ".join(items)


def load_run(run_dir) -> RunRecord:
    """Read ``config.json``, ``log.jsonl`` and, if present, ``summary.json`` of a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    return RunRecord(path=run_dir, config=read_json(run_dir / CONFIG),
                     log=read_log(run_dir / LOG), summary=read_summary(run_dir))


def find_runs(root) -> List[Path]:
    """Every run directory (one holding config.json) under ``root``, sorted."""
    return sorted(p.parent for p in Path(root).rglob(CONFIG))
