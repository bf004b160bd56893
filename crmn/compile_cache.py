"""The compile cache's folder (``$CRMN_CACHE`` or ``~/.cache/crmn``) and entries: a JSON
header line and payload bytes, never a pickle, checked on load (a bad one is a warning line
and a miss) and replaced atomically. A folder others could plant entries in is not used."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from crmn.runlog import replace_file

CACHE_ENV = "CRMN_CACHE"
DEFAULT_FOLDER = Path("~/.cache/crmn")
#: the entries' layout version: a header of another format is a foreign entry
FORMAT = 1
#: what the progress line and the logs say about a backend's compilation
HIT, MISS, OFF = "hit", "miss", "off"


def warn(message: str) -> None:
    print(f"crmn: compile cache: {message}", file=sys.stderr, flush=True)


def folder() -> Tuple[Path, bool]:
    """(the cache folder, whether the user chose it through ``$CRMN_CACHE``)."""
    chosen = os.environ.get(CACHE_ENV)
    return Path(chosen or DEFAULT_FOLDER).expanduser(), bool(chosen)


def folder_problem(path: Path, chosen: bool) -> Optional[str]:
    """Why ``path`` may not hold cache entries, or None: the default folder must be yours
    alone; ``$CRMN_CACHE`` a group's, not everyone's (unless yours with the sticky bit)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    own, mode = st.st_uid == os.getuid(), st.st_mode
    if not chosen and not own:
        return f"{path} belongs to another user (uid {st.st_uid})"
    if not chosen and mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path} is writable by others (mode {stat.filemode(mode)}); "
                f"chmod go-w it, or choose a shared folder with ${CACHE_ENV}")
    if chosen and mode & stat.S_IWOTH and not (own and mode & stat.S_ISVTX):
        return (f"{path} (${CACHE_ENV}) is writable by every user (mode "
                f"{stat.filemode(mode)}); use a folder of your own or of your group")
    return None


class CompileCache:
    """The checked cache folder of this process (build one with :func:`open_cache`)."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.entry"

    def load(self, kind: str, key: str,
             check: Callable[[Dict], Optional[str]] = lambda header: None
             ) -> Optional[Tuple[Dict, bytes]]:
        """(header, payload) of entry ``key``, or None: absent, or unusable (one warning
        line); ``check(header)`` says why the entry is foreign, or None."""
        path = self.path(kind, key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            warn(f"{path}: unreadable ({exc.strerror or exc}); compiling afresh")
            return None
        head, sep, payload = blob.partition(b"\n")
        try:
            header = json.loads(head.decode()) if sep else None
        except (ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            problem = "no valid header (corrupt)"
        elif header.get("format") != FORMAT or header.get("key") != key:
            problem = "written for another key or format (foreign)"
        elif header.get("size") != len(payload):
            problem = f"truncated ({len(payload)} of {header.get('size')} bytes)"
        elif header.get("sha256") != hashlib.sha256(payload).hexdigest():
            problem = "its bytes do not match their sha256 (corrupt)"
        else:
            problem = check(header)
        if problem:
            warn(f"{path}: {problem}; compiling afresh and replacing it")
            return None
        return header, payload

    def store(self, kind: str, key: str, header: Dict, payload: bytes) -> None:
        """Write entry ``key`` atomically; a failed write is a warning line, not an error."""
        full = dict(header, format=FORMAT, key=key, size=len(payload),
                    sha256=hashlib.sha256(payload).hexdigest())
        head = json.dumps(full, sort_keys=True, allow_nan=False).encode()
        path = self.path(kind, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            replace_file(path, head + b"\n" + payload)
        except OSError as exc:
            warn(f"{path}: could not write ({exc.strerror or exc}); the run goes on uncached")


def open_cache(enabled: bool = True) -> Optional[CompileCache]:
    """The cache of this process, or None: turned off, or a folder that fails the rule."""
    if not enabled:
        return None
    root, chosen = folder()
    problem = folder_problem(root, chosen)
    if problem is None:
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            problem = f"{root}: cannot create it ({exc.strerror or exc})"
        else:
            problem = folder_problem(root, chosen)  # it exists now, whoever made it
    if problem:
        warn(f"{problem}; compiling without the cache")
        return None
    return CompileCache(root)


def fingerprint(*parts: str) -> str:
    """sha256 (hex) of the parts, each length-prefixed so that no two splits collide."""
    data = [part.encode() for part in parts]
    return hashlib.sha256(b"".join(b"%d:" % len(d) + d for d in data)).hexdigest()


def source_hash(files) -> str:
    """sha256 of the named source files' bytes."""
    return fingerprint(*(Path(f).read_bytes().decode("utf-8", "replace") for f in files))
