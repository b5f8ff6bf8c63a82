"""Image files: the checks that refuse an unusable file, decoding, normalisation, the on-disk cache.

One set of file checks (:func:`file_fault`) serves both the validation of a table
(:func:`check_image_file`) and the reader (:func:`read_raw`), so a file is refused for
the same reasons, in the same words, wherever it is met.

Intensity normalisation (:func:`read_image`)
    Pixels are read at their stored precision (16-bit PNGs through
    ``cv2.IMREAD_UNCHANGED``; DICOM through its modality and VOI LUTs), then each
    image is mapped to float32 [0, 1] by its own 0.5th and 99.5th percentiles.
    Radiographs from different devices and formats have unrelated absolute
    scales (12-bit data in a 16-bit container, 8-bit JPEGs, DICOM values after a
    rescale), so a fixed divisor would give each source a different contrast; a
    per-image window puts them on one scale, and using percentiles instead of the
    minimum and maximum keeps a few extreme pixels (burned-in markers, metal,
    collimator black) from compressing the anatomy into a narrow band. Only the
    outer 0.5 % tails saturate; the rest of the 16-bit range is kept at full
    precision (never reduced to 8 bits).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

import io_utils
from errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
PCT_LOW, PCT_HIGH = 0.5, 99.5
# The decode checks refuse images smaller than this on a side (or of one value): no
# radiograph is, and a thumbnail or placeholder would only be upscaled into noise.
MIN_IMAGE_SIDE = 32
# OpenCV refuses to decode more pixels than this (its CV_IO_MAX_IMAGE_PIXELS default), and
# raises a multi-line cv2.error when asked to; a PNG header that claims more is refused first.
MAX_IMAGE_PIXELS = 1 << 30
# Percentiles from at most this many pixels: a strided subsample estimates them
# to well under one grey level and keeps full-resolution images fast.
_PCT_MAX_SAMPLES = 1 << 18
# The end markers of PNG and JPEG are looked for in this many trailing bytes.
_TAIL_BYTES = 64

def file_kind(mode: int) -> str:
    """What a ``stat`` mode is, in words (``regular file``, ``FIFO``, ...)."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def degenerate_image(arr: np.ndarray) -> str | None:
    """Why a decoded image cannot be a radiograph (too small, or one value), or ``None``."""
    h, w = arr.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        return f"image too small ({w}x{h} px; at least {MIN_IMAGE_SIDE} px a side)"
    lo, hi = np.nanmin(arr), np.nanmax(arr)
    if not hi > lo:
        return f"constant image (every pixel {float(lo):g})"
    return None


def check_image_file(path: str | os.PathLike, decode: bool = False) -> str | None:
    """Why an image file is unusable, or ``None`` if it looks fine.

    Cheap checks always (exists, a regular file (a FIFO would block a reader), not
    empty, PNG/JPEG/DICOM header, PNG ``IEND`` or JPEG end-of-image marker present, so
    truncated downloads are caught, and no PNG header claiming more pixels than a decoder
    will allocate); ``decode=True`` also decodes the whole image and refuses degenerate
    ones (:func:`degenerate_image`: under ``MIN_IMAGE_SIDE`` px on a side, or constant).
    DICOM files are always decoded.
    """
    return _check_image(path, decode)[0]


def _stat_fault(p: Path) -> str | None:
    """Why ``p`` cannot be read as an image file at all (missing, not a regular file, empty)."""
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return "image file not found"
    except OSError as exc:  # a symlink loop, a folder without search permission
        return f"cannot read image file: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):  # reading a FIFO or a device would block or never end
        return f"image path is not a regular file ({file_kind(st.st_mode)})"
    if st.st_size == 0:
        return "zero-byte image file"
    return None


def _content_fault(p: Path, head: bytes, tail: bytes) -> tuple[str | None, str | None]:
    """Why a file's first 132 and last ``_TAIL_BYTES`` bytes make it unusable (or ``None``),
    and what kind of image it is (``png``, ``jpeg``, ``dicom``, ``None``)."""
    kind = _sniff(head, p)
    if kind == "png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)", kind
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)", kind
    if kind is None and p.suffix.lower() in IMAGE_EXTENSIONS:
        return f"not a {p.suffix.lstrip('.').upper()} file (unrecognised header)", kind
    if kind == "png" and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if w * h > MAX_IMAGE_PIXELS:
            return f"image too large to decode ({w}x{h} px; at most {MAX_IMAGE_PIXELS} pixels)", kind
    return None, kind


def _head_and_tail(p: Path) -> tuple[bytes, bytes]:
    with open(p, "rb") as fh:
        head = fh.read(132)
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - _TAIL_BYTES))
        return head, fh.read()


def _check_image(path: str | os.PathLike, decode: bool) -> tuple[str | None, np.ndarray | None]:
    """:func:`check_image_file`'s reason, and the decoded image when it was decoded."""
    p = Path(path)
    if not str(path):
        return "no image path", None
    why = _stat_fault(p)
    if why is not None:
        return f"{why}: {p}", None
    arr = None
    try:
        why, kind = _content_fault(p, *_head_and_tail(p))
        if why is not None:
            return f"{why}: {p}", None
        if decode or kind == "dicom":
            arr = read_raw(p)
            why = degenerate_image(arr)
            if why is not None:
                return f"{why}: {p}", arr
    except DataError as exc:
        return str(exc), None
    except OSError as exc:
        return f"cannot read image file: {p}: {exc.strerror or exc}", None
    return None, arr


def _pixel_digest(arr: np.ndarray) -> str:
    """Identity of an image's pixels (shape, type and values), whatever file holds them."""
    h = hashlib.sha256(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()

def check_image_files(paths: Sequence[str], decode: bool = False, num_workers: int | None = None
                      ) -> tuple[list[str | None], list[str | None], dict[str, Any]]:
    """:func:`check_image_file` for every path, on threads. Returns the reasons in order
    (``None``: fine); with ``decode`` the pixel digest of every good image (else ``None``s),
    so that copies of one image under two names can be found; and
    ``{"mode", "files", "threads", "seconds"}``.

    Decoding takes milliseconds per full-size image and releases the GIL, so it gets a
    thread per core; the cheap checks are a few system calls per file, where more than
    one thread per 256 files only adds overhead.
    """
    workers = num_workers or io_utils.default_workers()
    if not decode:
        workers = max(1, min(workers, len(paths) // 256 + 1))

    def one(path: str) -> tuple[str | None, str | None]:
        reason, arr = _check_image(path, decode)
        return reason, (_pixel_digest(arr) if decode and reason is None and arr is not None else None)

    results: list[tuple[str | None, str | None]] = [(None, None)] * len(paths)
    start = time.perf_counter()
    io_utils.run_threaded(one, paths, workers, results.__setitem__, chunksize=1 if decode else 64)
    info = {"mode": "decode" if decode else "cheap", "files": len(paths), "threads": workers,
            "seconds": round(time.perf_counter() - start, 3)}
    return [r for r, _ in results], [d for _, d in results], info


# --------------------------------------------------------------------------- images

def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file found in a folder is one of ours to read: an image extension, or no
    extension and DICOM's ``DICM`` magic (DICOM files often have no extension). A FIFO or
    other non-regular file is never opened here (a reader would wait forever); named like an
    image, it counts, so the image check can refuse it by name."""
    p = Path(path)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    if p.suffix or not p.is_file():
        return False
    try:
        with open(p, "rb") as fh:
            return _sniff(fh.read(132), p) == "dicom"
    except OSError:
        return False


def _sniff(head: bytes, path: Path) -> str | None:
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head[128:132] == b"DICM" or (path.suffix.lower() in (".dcm", ".dicom") and len(head) > 0):
        # DICOM files without the preamble exist; pydicom decides whether it can read them.
        return "dicom"
    return None


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=True)
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken or compressed files
        raise DataError.at(path, None, f"cannot read DICOM pixels ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        arr = arr[0]  # multi-frame: the first frame
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr.astype(np.float32), cv2.COLOR_RGB2GRAY)
    arr = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        arr = apply_voi_lut(arr, ds, index=0).astype(np.float64)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        # MONOCHROME1 stores bone dark; flip so that, as in PNGs, bone is bright.
        arr = arr.max() + arr.min() - arr
    return arr


def _png_damage(data: bytes) -> str | None:
    """Why a PNG's chunk layout is damaged (a chunk running past the end, a critical chunk
    whose CRC does not match, e.g. a damaged IDAT behind an intact IEND), or ``None``.
    Ancillary chunks (lower-case first letter) are not CRC-checked: decoders skip them."""
    view, pos = memoryview(data), len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        end = pos + 8 + int.from_bytes(data[pos:pos + 4], "big")
        if end + 4 > len(data):
            return f"the chunk at byte {pos} runs past the end of the file"
        kind = bytes(data[pos + 4:pos + 8])
        if kind[:1].isupper() and zlib.crc32(view[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            return f"CRC error in the {kind.decode('latin-1')!r} chunk at byte {pos}"
        if kind == b"IEND":
            return None
        pos = end + 4
    return "no IEND chunk where the chunks end"


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """The image as stored, one channel: uint8/uint16 for PNG/JPEG (colour -> gray at
    the same bit depth), float64 for DICOM after modality LUT, VOI LUT/window and
    MONOCHROME1 inversion. Raises :class:`DataError` naming the file."""
    p = Path(path)
    why = _stat_fault(p)
    if why is not None:
        raise DataError.at(p, None, why)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError.at(p, None, f"cannot read image file: {exc.strerror or exc}") from None
    if not data:
        raise DataError.at(p, None, "zero-byte image file")
    why, kind = _content_fault(p, data[:132], data[-_TAIL_BYTES:])
    if why is not None:
        raise DataError.at(p, None, why)
    if kind == "dicom":
        return _read_dicom(p)
    if kind == "png" and (damage := _png_damage(data)):
        # before OpenCV, whose libpng would print its own lines to stderr and then fail
        raise DataError.at(p, None, f"cannot decode image: corrupt PNG ({damage})")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # e.g. a JPEG header claiming more pixels than OpenCV allocates
        raise DataError.at(p, None, f"cannot decode image (OpenCV: {exc.err})") from None
    if img is None or img.size == 0:
        raise DataError.at(p, None, "cannot decode image (corrupt or unsupported format)")
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] == 2:  # gray + alpha
            img = img[:, :, 0]
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    return img


def normalize_intensity(arr: np.ndarray, low: float = PCT_LOW, high: float = PCT_HIGH) -> np.ndarray:
    """Map an image to float32 [0, 1] by its own ``low``/``high`` percentiles (see module doc)."""
    a = np.asarray(arr, dtype=np.float32)
    step = max(1, int(math.sqrt(a.size / _PCT_MAX_SAMPLES)))
    sample = a[::step, ::step] if a.ndim == 2 else a.ravel()[::step * step]
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:  # near-constant image: fall back to the full range
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.zeros(a.shape, np.float32)
    out = (a - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Any supported image as float32 HxW in [0, 1] (8/16-bit PNG, JPEG, DICOM).

    Decoded at stored precision (``cv2.IMREAD_UNCHANGED``, never an 8-bit RGB
    conversion, which would saturate 16-bit data), then normalised per image
    between its 0.5th and 99.5th percentiles; see the module docstring for why.
    """
    return normalize_intensity(read_raw(path))


def letterbox_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``h`` x ``w`` image lies in its ``size`` x ``size`` letterbox:
    ``(top, left, height, width)`` (scale ``size / max(h, w)``, centred)."""
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to fit ``size`` x ``size`` keeping the aspect ratio, centred, zero-padded."""
    h, w = img.shape[:2]
    top, left, nh, nw = letterbox_geometry(h, w, size)
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    resized = cv2.resize(img, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else img
    out = np.zeros((size, size), dtype=img.dtype)
    out[top:top + nh, left:left + nw] = resized
    return out


def unletterbox(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`letterbox` for a map over the letterboxed square (a Grad-CAM,
    say): the padding cropped off and the rest resized to the original ``(h, w)``, float32."""
    h, w = int(shape[0]), int(shape[1])
    top, left, nh, nw = letterbox_geometry(h, w, arr.shape[0])
    inner = np.ascontiguousarray(arr[top:top + nh, left:left + nw], dtype=np.float32)
    return cv2.resize(inner, (w, h), interpolation=cv2.INTER_LINEAR)


def load_resized(path: str | os.PathLike, img_size: int) -> np.ndarray:
    """``read_image`` + ``letterbox``, quantised to uint16 (exactly what the cache stores)."""
    img = letterbox(read_image(path), img_size)
    return np.round(img * 65535.0).astype(np.uint16)


def _save_npy(tmp: Path, arr: np.ndarray) -> None:
    # np.save into a real file writes with fwrite and reports a short write (a full disk) as
    # an OSError without errno ("9216 requested and 6080 written"), which no disk-full check
    # recognises. Serialised in memory and written through Python's file object, a full disk
    # raises OSError(ENOSPC), which atomic_write turns into its one-line DiskFullError.
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    with open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())


class ImageCache:
    """Decoded, normalised and letterboxed images on disk, so later epochs skip PNG decoding.

    Layout: ``<cache_dir>/<img_size>px/<k[:2]>/<k>.npy`` where ``k`` is the SHA-1
    of (cache format version, resolved image path, ``img_size``, the file's
    ``mtime_ns``, size in bytes, ``ctime_ns`` and inode). Each entry is a uint16 ``img_size`` x
    ``img_size`` array (the [0, 1] image times 65535). Replacing or touching an
    image changes its key, so a stale entry is never read; old entries are
    simply left behind (delete the folder to reclaim space). Entries are
    written atomically, so parallel workers and interrupted runs are safe.
    """

    VERSION = 1
    # Entries also kept in RAM by the process that owns the dataset, up to this many bytes:
    # from the second epoch on, an image then costs neither a path hash nor a file read
    # (15-20% of a training step for the demo's small model on the CPU). 84 MB hold the
    # demo's 4,600 images at 96 px; a real dataset at 384 px mostly stays on disk.
    MEMORY_BYTES = 1 << 30

    def __init__(self, cache_dir: str | os.PathLike, img_size: int) -> None:
        self.cache_dir = Path(cache_dir)
        self.img_size = int(img_size)
        self.root = self.cache_dir / f"{self.img_size}px"
        self._memory: dict[str, np.ndarray] = {}
        self._memory_left = self.MEMORY_BYTES

    def entry_path(self, path: str | os.PathLike) -> Path:
        p = Path(path).resolve()
        try:
            st = p.stat()
        except FileNotFoundError:
            raise DataError.at(p, None, "image file not found") from None
        # mtime and size alone miss a replacement that restores them (cp -p, rsync -t). The
        # inode change time cannot be set from user space and moves on every rewrite, and a
        # file replaced by rename has a new inode: both come with the same stat call, free.
        key = f"{self.VERSION}|{p}|{self.img_size}|{st.st_mtime_ns}|{st.st_size}|{st.st_ctime_ns}|{st.st_ino}"
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
        return self.root / digest[:2] / f"{digest}.npy"

    def _load(self, entry: Path) -> np.ndarray | None:
        try:
            arr = np.load(entry, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None  # absent, or unreadable: rebuilt below
        if arr.shape != (self.img_size, self.img_size) or arr.dtype != np.uint16:
            return None
        return arr

    def get(self, path: str | os.PathLike) -> np.ndarray:
        """uint16 ``img_size`` x ``img_size`` image (read-only), from memory, the cache or
        decoded and stored. Within one process each image is read from disk once."""
        key = os.fspath(path)
        arr = self._memory.get(key)
        if arr is None:
            arr, _ = self._get(path)
            self._remember(key, arr)
        return arr

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker receives the cache without the images held in RAM.
        return {**self.__dict__, "_memory": {}, "_memory_left": self.MEMORY_BYTES}

    def _remember(self, key: str, arr: np.ndarray) -> None:
        # Not in DataLoader workers: each holds its own copy of the dataset, so memory would
        # multiply by their number, and workers that are not persistent end with the epoch.
        if arr.nbytes > self._memory_left or torch.utils.data.get_worker_info() is not None:
            return
        arr.setflags(write=False)
        self._memory[key] = arr
        self._memory_left -= arr.nbytes

    def _get(self, path: str | os.PathLike) -> tuple[np.ndarray, bool]:
        entry = self.entry_path(path)
        arr = self._load(entry)
        if arr is not None:
            return arr, False
        arr = load_resized(path, self.img_size)
        io_utils.atomic_write(entry, lambda tmp: _save_npy(tmp, arr), fsync=False)  # re-derivable
        return arr, True

    def warm(self, paths: Iterable[str | os.PathLike], num_workers: int | None = None,
             progress: bool = True) -> dict[str, Any]:
        """Fill the cache for ``paths`` (threads, default one per core: OpenCV decodes
        outside the GIL). Returns ``{"total", "decoded", "cached", "failed"}``; ``failed``
        maps the position of every image that cannot be decoded to its one-line reason
        (``tables.check_decodable`` turns these into CSV rows)."""
        return _decode_each(list(paths), lambda p: self._get(p)[1], num_workers, progress,
                            f"cache {self.img_size}px")


def _decode_each(paths: Sequence[str | os.PathLike], one: Callable[[Any], bool], num_workers: int | None,
                 progress: bool, desc: str) -> dict[str, Any]:
    """Run ``one`` (decode a path; True if it was decoded rather than read from the cache) on
    every path, collecting the images that fail instead of stopping at the first."""
    failed: dict[int, str] = {}
    decoded = 0
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)

    def safe(p: str | os.PathLike) -> bool | str:
        try:
            return one(p)
        except DataError as exc:
            return str(exc)
        except OSError:
            raise  # the cache's disk (full, read-only), not this image
        except Exception as exc:  # any decoder failure is this image's
            return f"{p}: cannot decode image ({type(exc).__name__}: {exc})"

    def done(i: int, res: bool | str) -> None:
        nonlocal decoded
        if isinstance(res, str):
            failed[i] = res
        else:
            decoded += int(res)
        bar.update()

    try:
        io_utils.run_threaded(safe, paths, num_workers or io_utils.default_workers(), done)
    finally:
        bar.close()
    return {"total": len(paths), "decoded": decoded, "cached": len(paths) - decoded - len(failed),
            "failed": failed}


def decode_all(paths: Sequence[str | os.PathLike], img_size: int, cache_dir: str | os.PathLike | None = None,
               num_workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Decode every image once at ``img_size``: with ``cache_dir`` into its :class:`ImageCache`
    (the warm-up), without it decoded and dropped. Returns what :meth:`ImageCache.warm` does."""
    if cache_dir is not None:
        return ImageCache(cache_dir, img_size).warm(paths, num_workers=num_workers, progress=progress)
    return _decode_each(list(paths), lambda p: load_resized(p, img_size) is not None, num_workers, progress,
                        f"decode {img_size}px")
