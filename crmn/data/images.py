"""CIFAR as image folders ``train/<class>/`` and ``test/<class>/`` of PNG or JPEG files, or a
.tar/.tar.gz/.tar.xz/.zip of them. Nothing is extracted: every member is read into memory and
checked (paths, links, sizes, whole 32x32 RGB images, classes, counts); the decoded arrays are
cached as ``<cache>/data/<sha256>.npz``, read back without pickles. Never the official bytes."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import stat
import sys
import tarfile
import time
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from crmn import compile_cache
from crmn.data.sources import PathLike, locate
from crmn.errors import DataError
from crmn.runlog import replace_file

#: class folder names in the official label order (the datasets' ``batches.meta``/``meta``)
CLASSES = {
    "cifar10": ("airplane automobile bird cat deer dog frog horse ship truck").split(),
    "cifar100": (
        "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge "
        "bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud "
        "cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox "
        "girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
        "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
        "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray "
        "road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
        "streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
        "trout tulip turtle wardrobe whale willow_tree wolf woman worm").split(),
}
LABEL = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}
ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".zip")
SPLITS = ("train", "test")
COUNTS = {"train": 50_000, "test": 10_000}  # images of both CIFARs
#: bytes an image file may have (a 32x32 PNG or JPEG needs a few KB): no memory bombs
MAX_FILE = 1 << 20
_FORMAT = b"crmn image-folder cache 1"  # part of the cache key: a new layout, new entries
#: what file browsers leave beside images (besides dot files and __MACOSX/): skipped
JUNK = ("thumbs.db", "desktop.ini", "__macosx")
STALE_S = 3600  # a cache temporary this old is a killed write's (a write takes seconds)


def source(data_dir: PathLike, name: Optional[str] = None) -> Optional[Path]:
    """The archive, or folder holding ``train/`` and ``test/`` (or one level down), else None;
    ``name``: a folder with one of them and not the official files is refused (no download)."""
    path = Path(data_dir)
    if not path.is_dir():
        return path if path.name.lower().endswith(ARCHIVES) else None
    roots = (path, *sorted(p for p in path.iterdir() if p.is_dir()))
    for root in roots:
        if all((root / s).is_dir() and not (root / s).is_symlink() for s in SPLITS):
            return root
    for root in roots if name is not None and locate(name, path) is None else ():
        have = [s for s in SPLITS if (root / s).is_dir()]
        if have:
            lacks = next(s for s in SPLITS if s not in have)
            raise DataError(f"{root}: {have[0]}/ is there but {lacks}/ is missing; an image "
                            f"folder needs train/<class>/ and test/<class>/: add {lacks}/, or "
                            f"give the official files as --data-dir; nothing was written")
    return None


def describe(name: str, data_dir: PathLike, subset: Optional[int] = None) -> Optional[str]:
    """How a report names data that are not the official files as they are, else None."""
    parts = [f"{LABEL[name]} from image folders, re-encoded"] if source(data_dir) else []
    if subset is not None:
        parts.append(f"a quick look on {subset:,} training images (--subset)")
    return "; ".join(parts) or None


#: the arrays :func:`check` loaded, handed once to the run's own :func:`load` of them
_handed: Dict[Tuple, Dict[str, np.ndarray]] = {}


def check(name: str, data_dir: PathLike, subset: Optional[int] = None) -> bool:
    """Whether ``data_dir`` is an image source; one is loaded now, before any run folder exists."""
    src = source(data_dir, name)
    if src is not None:
        _handed.clear()
        _handed[_held_key(name, src, subset is None)] = load(name, src, subset is None)
    return src is not None


def _held_key(name: str, src: Path, exact: bool) -> Tuple:
    st = src.stat()
    return name, str(src.resolve()), st.st_size, st.st_mtime_ns, exact


def load(name: str, src: Path, exact: bool = True) -> Dict[str, np.ndarray]:
    """``x_train`` uint8 (N, 3, 32, 32), ``y_train`` int64, ``x_test``, ``y_test`` of ``src``,
    cached or decoded; ``exact``: the counts must be the dataset's (no ``--subset``)."""
    if not src.exists():
        raise DataError(f"no such file or folder {src}; give an image folder or its archive "
                        "as --data-dir")
    held = _handed.pop(_held_key(name, src, exact), None) if _handed else None
    if held is not None:
        return dict(held)
    if name not in CLASSES:
        raise DataError(f"{src}: image folders are read for cifar10 and cifar100, not {name}; "
                        "give the official files as --data-dir")
    t0 = time.perf_counter()
    path = _cache_path(key(name, src))
    arrays = _read_cache(path) if path else None
    how = "cache hit"
    if arrays is None:
        arrays = _decode(name, src, exact)
        how = "decoded, now cached" if path and _write_cache(path, arrays) else "decoded"
    _check_counts(name, src, {s: len(arrays[f"y_{s}"]) for s in SPLITS}, exact)
    print(f"data: {LABEL[name]} from image folders ({how}), "
          f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    return arrays


def _refuse(src: Path, member: str, why: str) -> DataError:
    return DataError(f"{src}: member {member!r} {why}; nothing was written: remove it, "
                     "or pack only train/<class>/ and test/<class>/ of image files")


def _members(src: Path) -> Iterator[Tuple[str, bytes]]:
    """Every regular file of ``src`` with its ``/``-separated path, each entry checked."""
    try:
        for name, kind, size, read in _entries(src):
            parts = PurePosixPath(name).parts
            if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
                raise _refuse(src, name, "leaves the folder")
            if kind in ("link", "other"):
                raise _refuse(src, name, "is a link" if kind == "link" else "is no file")
            if kind == "file" and not any(p.startswith(".") or p.lower() in JUNK for p in parts):
                if size > MAX_FILE:
                    raise _refuse(src, name, f"has {size:,} bytes, too many for an image")
                yield name, read()
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {src}: {getattr(e, 'strerror', None) or e}; check the "
                        "file (a complete .tar, .tar.gz, .tar.xz or .zip, or a folder)") from None


def _entries(src: Path) -> Iterator[Tuple[str, str, int, Callable[[], bytes]]]:
    """``(path, kind, size, read)`` of every entry of a folder, zip or tar."""
    if src.is_dir():
        for top, dirs, files in os.walk(src):
            dirs.sort()
            for entry in sorted(dirs + files):
                path = Path(top, entry)
                st = path.lstat()
                kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
                        else "file" if stat.S_ISREG(st.st_mode) else "other")
                yield path.relative_to(src).as_posix(), kind, st.st_size, path.read_bytes
    elif src.name.lower().endswith(".zip"):
        with zipfile.ZipFile(src) as z:
            for info in z.infolist():
                kind = ("link" if stat.S_ISLNK(info.external_attr >> 16)
                        else "dir" if info.is_dir() else "file")
                yield info.filename, kind, info.file_size, functools.partial(z.read, info)
    else:
        with tarfile.open(src, "r:*") as tar:
            for m in tar:
                kind = ("link" if m.issym() or m.islnk() else "dir" if m.isdir()
                        else "file" if m.isfile() else "other")
                yield m.name, kind, m.size, lambda m=m: tar.extractfile(m).read()


def _decode(name: str, src: Path, exact: bool) -> Dict[str, np.ndarray]:
    """All images of ``src``, checked, in (split, label, path) order (folder = its archive)."""
    classes = {c: i for i, c in enumerate(CLASSES[name])}
    found: Dict[str, List[Tuple[int, str, bytes]]] = {s: [] for s in SPLITS}
    prefixes: set = set()
    for member, blob in _members(src):
        parts = PurePosixPath(member).parts  # [folder/]split/class/file
        i = 0 if parts[0] in SPLITS else 1
        if len(parts) <= i or parts[i] not in SPLITS:
            continue
        if len(parts) != i + 3:
            raise _refuse(src, member, f"is not at {parts[i]}/<class>/<image>")
        prefixes.add(parts[:i])
        if len(prefixes) > 1:
            raise _refuse(src, member, "is in a second folder holding train/ or test/")
        split, cls = parts[i], parts[i + 1]
        if cls not in classes:
            shown = ", ".join(CLASSES[name][:10]) + (", ..." if len(classes) > 10 else "")
            raise DataError(f"{src}: unknown class folder {split}/{cls}/ for {name}; the "
                            f"folders must be named after its classes ({shown}): rename it, "
                            "or choose the --dataset it belongs to")
        found[split].append((classes[cls], member, blob))
    for split in SPLITS:
        missing = sorted(set(classes) - {CLASSES[name][k] for k, _, _ in found[split]},
                         key=classes.get)
        if missing:
            raise DataError(f"{src}: no images in {split}/{missing[0]}/ (of {len(missing)} "
                            f"missing class folders); {LABEL[name]} needs train/<class>/ "
                            "and test/<class>/ for each of its classes: add the missing ones")
    _check_counts(name, src, {s: len(found[s]) for s in SPLITS}, exact)
    out = {}
    with _pillow_limits() as image:
        for split in SPLITS:
            items = sorted(found.pop(split), key=lambda t: t[:2])
            x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
            for j, (_, member, blob) in enumerate(items):
                x[j] = _pixels(image, blob, src, member)
            out[f"x_{split}"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            out[f"y_{split}"] = np.array([k for k, _, _ in items], dtype=np.int64)
    return out


@contextlib.contextmanager
def _pillow_limits():
    """Pillow, with its pixel limit at one 32x32 image and truncated files refused, meanwhile."""
    from PIL import Image, ImageFile

    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = 32 * 32, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size checked
            yield Image
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _pixels(image, blob: bytes, src: Path, member: str) -> np.ndarray:
    """(32, 32, 3) uint8 of one PNG or JPEG; its header's size and mode checked first."""
    try:
        with image.open(io.BytesIO(blob), formats=("PNG", "JPEG")) as im:
            if im.size == (32, 32) and im.mode == "RGB":
                im.load()
                return np.asarray(im)
            why = f"{im.size[0]}x{im.size[1]} {im.mode}"
    except image.UnidentifiedImageError:  # its words show a Python object's repr
        why = "not a PNG or JPEG file"
    except (OSError, SyntaxError, ValueError, EOFError, image.DecompressionBombError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise _refuse(src, member, f"is not a whole 32x32 RGB PNG or JPEG image ({why})")


def _check_counts(name: str, src: Path, counts: Dict[str, int], exact: bool) -> None:
    for split in SPLITS:
        if exact and counts[split] != COUNTS[split]:
            raise DataError(f"{src}: {split}/ holds {counts[split]:,} images, {LABEL[name]} "
                            f"has {COUNTS[split]:,}; complete it, or pass --subset N for a "
                            "quick look on N training images")


def key(name: str, src: Path) -> str:
    """sha256 over the format, the dataset and the source's bytes (a folder's: every member)."""
    h = hashlib.sha256(_FORMAT + b"\0" + name.encode() + b"\0")
    if src.is_dir():
        for member, blob in _members(src):
            h.update(f"{member}\0{len(blob)}\0".encode())
            h.update(blob)
        return h.hexdigest()
    try:
        with open(src, "rb") as f:
            return hashlib.file_digest(f, lambda: h).hexdigest()
    except OSError as e:
        raise DataError(f"cannot read {src}: {e.strerror or e}; give an existing archive "
                        "or folder as --data-dir") from None


def _warn(message: str) -> None:
    print(f"crmn: image-folder cache: {message}", file=sys.stderr, flush=True)


def _cache_path(key: str) -> Optional[Path]:
    """``<cache>/data/<key>.npz``, or None (one warning) where the cache folder may not be used."""
    root, chosen = compile_cache.folder()
    problem = compile_cache.folder_problem(root, chosen)
    if problem is None:
        try:
            (root / "data").mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            problem = f"{root}: cannot create it ({e.strerror or e})"
        else:
            problem = compile_cache.folder_problem(root, chosen)
    if problem:
        _warn(f"{problem}; decoding the images without keeping them")
        return None
    for tmp in (root / "data").glob(".*.tmp"):  # writes killed long ago left them
        with contextlib.suppress(OSError):  # another process removed it, or a read-only cache
            if time.time() - tmp.lstat().st_mtime > STALE_S:
                tmp.unlink()
    return root / "data" / f"{key}.npz"


def _read_cache(path: Path) -> Optional[Dict[str, np.ndarray]]:
    """The cached arrays, or None: absent, or damaged (one warning: rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        _warn(f"{path}: unreadable ({why}); decoding the images again and replacing it")
        return None
    for s in SPLITS:
        x, y = arrays[f"x_{s}"], arrays[f"y_{s}"]
        if x.dtype != np.uint8 or x.shape[1:] != (3, 32, 32) or y.dtype != np.int64 \
                or y.shape != x.shape[:1]:
            _warn(f"{path}: not the layout written here; decoding the images again")
            return None
    return arrays


def _write_cache(path: Path, arrays: Dict[str, np.ndarray]) -> bool:
    """Whether ``arrays`` are now cached at ``path`` (else one warning)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        replace_file(path, buf.getvalue())
    except OSError as e:
        _warn(f"{path}: could not write ({e.strerror or e}); the images are decoded, not "
              "kept, and the next run decodes them again")
        return False
    return True
