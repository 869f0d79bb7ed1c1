"""Frame sources, all through OpenCV: camera device, stream URL, video file, folder of images.

Each source opens, reads one frame at a time and closes; :class:`ManagedSource` wraps one and
keeps the service up when it fails: it reopens with exponential backoff and reports every change
of state (up, down, ended) through a callback, never raising into the frame loop.

Folder sources inspect every image file once, in name order: those present at start, then each
new one. The names already inspected are kept in a small append-only file in the storage
directory, so a restart neither repeats nor skips a file (a file being inspected when the agent
was killed is inspected again, with the same frame id).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from agent.config import MIN_FRAME_SIDE, AgentConfig, CaptureConfig
from agent.preprocess import IMAGE_SUFFIXES, ImageError, to_uint8

logger = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The source cannot be opened, or stopped giving frames; it will be reopened."""


class EndOfSource(Exception):
    """A video file without ``loop`` reached its end."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray | None  # BGR / grey uint8 as OpenCV gives it; None for a bad frame
    frame_id: str
    source: str  # where it came from, for the verdict's "source" field
    error: str | None = None  # why a bad frame could not be read
    key: str | None = None  # folder sources: the file name, marked inspected once handled


def new_run_id() -> str:
    """Unique per agent start: UTC start time plus randomness, prefix of stream frame ids."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)


def redact_url(url: str) -> str:
    """The URL without its password, for logs and payloads."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class FrameSource(Protocol):
    kind: str
    name: str

    def open(self) -> None: ...

    def read(self, fresh: bool = False) -> Frame | None: ...

    def skip(self) -> None: ...

    def done(self, frame: Frame) -> None: ...

    def close(self) -> None: ...


class VideoCaptureSource:
    """A camera device, a stream URL or a video file, read with cv2.VideoCapture."""

    def __init__(self, kind: str, target: str | int, cfg: CaptureConfig, run_id: str) -> None:
        self.kind = kind
        self.target = target
        self.cfg = cfg
        self.run_id = run_id
        self.name = redact_url(str(target)) if kind == "stream" else str(target)
        self._cap: Any = None
        self._seq = 0
        self._index = 0  # frame index within the file, for video sources
        self._read_since_open = 0

    def _capture(self) -> Any:
        c = self.cfg
        if self.kind == "device":
            target = int(self.target) if str(self.target).isdigit() else str(self.target)
            return cv2.VideoCapture(target, cv2.CAP_V4L2)
        if self.kind == "stream":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(c.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(c.read_timeout_s * 1000)]
            return cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG, params)
        return cv2.VideoCapture(str(self.target))

    def open(self) -> None:
        if self.kind == "video" and not Path(str(self.target)).is_file():
            raise SourceError(f"video file {self.target} does not exist")
        try:
            cap = self._capture()
        except cv2.error as exc:
            raise SourceError(f"OpenCV cannot open {self.name}: {exc}") from exc
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"OpenCV cannot open {self.name} (missing, busy, or an unsupported format)")
        if self.kind == "device":
            self._configure_device(cap)
        self._cap = cap
        self._index = 0
        self._read_since_open = 0

    def _configure_device(self, cap: Any) -> None:
        c = self.cfg
        settings = [(cv2.CAP_PROP_FRAME_WIDTH, c.width), (cv2.CAP_PROP_FRAME_HEIGHT, c.height),
                    (cv2.CAP_PROP_FPS, c.fps)]
        if c.mode == "trigger":
            settings.append((cv2.CAP_PROP_BUFFERSIZE, 1))  # fewer stale frames to drop per shot
        for prop, value in settings:
            if value is not None and not cap.set(prop, value):
                logger.warning("camera %s ignored setting %s=%s", self.name, prop, value)

    def read(self, fresh: bool = False) -> Frame | None:
        if self._cap is None:
            raise SourceError(f"{self.name} is not open")
        if fresh and self.kind in ("device", "stream"):
            for _ in range(self.cfg.trigger_flush_frames):
                self._cap.grab()
        try:
            ok, image = self._cap.read()
        except cv2.error as exc:
            raise SourceError(f"reading {self.name} failed: {exc}") from exc
        if not ok or image is None:
            return self._end_or_fail()
        self._read_since_open += 1
        self._seq += 1
        index = self._index
        self._index += 1
        source = f"{self.name}#{index}" if self.kind == "video" else self.name
        frame_id = f"{self.run_id}-{self._seq:06d}"
        problem = frame_size_problem(image.shape[1], image.shape[0], self.cfg.max_pixels) if image.ndim >= 2 else (
            f"frame of shape {image.shape} is not an image")
        if problem:
            return Frame(image=None, frame_id=frame_id, source=source, error=problem)
        return Frame(image=image, frame_id=frame_id, source=source)

    def _end_or_fail(self) -> Frame | None:
        if self.kind != "video":
            raise SourceError(f"{self.name} stopped giving frames")
        if self._read_since_open == 0:
            raise SourceError(f"video file {self.name} has no readable frame (corrupt or unsupported codec)")
        if not self.cfg.loop:
            raise EndOfSource(self.name)
        # Seeking back is not reliable for every container; reopening is.
        self.close()
        self.open()
        return None

    def skip(self) -> None:
        """Take a frame and drop it: a live camera or stream read too slowly serves ever older frames."""
        if self._cap is not None and self.kind in ("device", "stream") and not self._cap.grab():
            raise SourceError(f"{self.name} stopped giving frames")

    def done(self, frame: Frame) -> None:
        return None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


# --- frame size before decoding ----------------------------------------------------------------------
# cv2 has no header-only API, and a few bytes of PNG can claim 70000x70000 pixels. The size is read from
# the file's header first; a format not recognised here is left to the decoder (whose errors are bad frames).

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xDA)}
BYTES_PER_PIXEL_MAX = 8  # uncompressed 16-bit RGBA: no image file of N pixels needs more than this per pixel
_FILE_SLACK_BYTES = 1 << 20  # headers, metadata, a poorly compressed small image


def _u16(data: bytes, at: int, order: str = "big") -> int:
    return int.from_bytes(data[at:at + 2], order)


def _u32(data: bytes, at: int, order: str = "big") -> int:
    return int.from_bytes(data[at:at + 4], order)


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return _u32(data, 16), _u32(data, 20)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None  # lost in the stream: not a header we understand
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            i += 2
            continue
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            height, width = _u16(data, i + 5), _u16(data, i + 7)
            return (width, height) if height else None  # height 0: given later (DNL); let the decoder see
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + _u16(data, i + 2)
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    if _u32(data, 14, "little") == 12:  # OS/2 BITMAPCOREHEADER
        return _u16(data, 18, "little"), _u16(data, 20, "little")
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)
    return abs(width), abs(height)  # negative height: stored top-down


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return _u16(data, 26, "little") & 0x3FFF, _u16(data, 28, "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = _u32(data, 21, "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    tokens: list[bytes] = []
    for line in data[:4096].split(b"\n"):
        tokens.extend(line.split(b"#", 1)[0].split())
        if len(tokens) >= 3:
            break
    if len(tokens) < 3 or not (tokens[1].isdigit() and tokens[2].isdigit()):
        return None
    return int(tokens[1]), int(tokens[2])


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "little" if data[:2] == b"II" else "big"
    if len(data) < 8 or _u16(data, 2, order) != 42:
        return None  # BigTIFF and others: left to the decoder
    ifd = _u32(data, 4, order)
    if ifd + 2 > len(data):
        return None
    found: dict[int, int] = {}
    for n in range(min(_u16(data, ifd, order), 512)):
        at = ifd + 2 + 12 * n
        if at + 12 > len(data):
            break
        tag, kind = _u16(data, at, order), _u16(data, at + 2, order)
        if tag in (256, 257):
            found[tag] = _u16(data, at + 8, order) if kind == 3 else _u32(data, at + 8, order)
    return (found[256], found[257]) if len(found) == 2 else None


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image file's header (PNG, JPEG, BMP, WebP, PNM, TIFF), or None if unknown."""
    if data.startswith(_PNG_SIG):
        return _png_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(b"BM"):
        return _bmp_size(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_size(data)
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return _pnm_size(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(data)
    return None


def frame_size_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why a frame of this size is not inspected, or None."""
    if width < MIN_FRAME_SIDE or height < MIN_FRAME_SIDE:
        return f"{width}x{height} pixels is smaller than the minimum of {MIN_FRAME_SIDE}x{MIN_FRAME_SIDE}"
    if width * height > max_pixels:
        return (f"{width}x{height} = {width * height} pixels is over capture.max_pixels ({max_pixels}); "
                "not decoded. Raise capture.max_pixels if frames this large are meant")
    return None


def decode_image_file(path: Path, max_pixels: int) -> np.ndarray:
    """An image file as OpenCV reads it (uint8), its size checked from the header before decoding.

    Raises ImageError, naming the file, for anything that is not an inspectable frame: too large (by
    file size or by header), too small, or any decoder failure (cv2.error included).
    """
    size = path.stat().st_size
    if size > max_pixels * BYTES_PER_PIXEL_MAX + _FILE_SLACK_BYTES:
        raise ImageError(f"{path}: a file of {size} bytes is larger than any image within capture.max_pixels "
                         f"({max_pixels}); not read")
    data = path.read_bytes()
    header = image_header_size(data)
    if header is not None and (problem := frame_size_problem(*header, max_pixels)):
        raise ImageError(f"{path}: {problem}")
    try:
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    except (cv2.error, MemoryError, ValueError) as exc:
        raise ImageError(f"{path}: the decoder refused it ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc})") from exc
    if frame is None or frame.ndim < 2:
        raise ImageError(f"{path}: not a readable image (corrupt, truncated or an unsupported format)")
    if problem := frame_size_problem(frame.shape[1], frame.shape[0], max_pixels):
        raise ImageError(f"{path}: {problem}")
    return to_uint8(frame, str(path))


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64]


class FolderSource:
    """Every image file in a folder, once each, in name order; new files as they appear."""

    kind = "folder"

    def __init__(self, folder: str | Path, state_dir: str | Path, cfg: CaptureConfig) -> None:
        self.folder = Path(folder)
        self.name = str(self.folder)
        self.cfg = cfg
        digest = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:12]
        self.state_file = Path(state_dir) / f"folder-{digest}.seen"
        self._seen: set[str] = set()
        self._pending: list[str] = []
        self._next_scan = 0.0
        self._log: Any = None

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"folder {self.folder} does not exist (or is not a folder)")
        present = set(self._scan_names())
        self._seen = self._load_seen() & present
        self._compact()
        self._pending = []
        self._next_scan = 0.0
        logger.info("folder %s: %d image(s) present, %d already inspected before", self.folder, len(present),
                    len(self._seen))

    def _load_seen(self) -> set[str]:
        try:
            return set(self.state_file.read_text(encoding="utf-8").splitlines())
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise SourceError(f"cannot read the folder state {self.state_file}: {exc}") from exc

    def _compact(self) -> None:
        """Rewrite the state with only names still present, so it cannot grow without end."""
        tmp = self.state_file.with_suffix(".tmp")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(f"{n}\n" for n in sorted(self._seen)), encoding="utf-8")
            os.replace(tmp, self.state_file)
            if self._log is not None:
                self._log.close()
            self._log = open(self.state_file, "a", encoding="utf-8")  # noqa: SIM115 - held open while the source is
        except OSError as exc:
            raise SourceError(f"cannot write the folder state {self.state_file}: {exc}") from exc

    def _scan_names(self) -> list[str]:
        try:
            with os.scandir(self.folder) as it:
                return sorted(
                    e.name for e in it
                    if not e.name.startswith(".") and "\n" not in e.name
                    and Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file()
                )
        except OSError as exc:
            raise SourceError(f"cannot list folder {self.folder}: {exc.strerror or exc}") from exc

    def _rescan(self) -> None:
        now = time.time()
        fresh = []
        for name in self._scan_names():
            if name in self._seen:
                continue
            try:
                mtime = (self.folder / name).stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime < self.cfg.settle_s:
                break  # still being written: wait for it rather than overtake it in name order
            fresh.append(name)
        self._pending = fresh

    def read(self, fresh: bool = False) -> Frame | None:
        if not self._pending and time.monotonic() >= self._next_scan:
            self._next_scan = time.monotonic() + self.cfg.poll_interval_s
            self._rescan()
        while self._pending:
            name = self._pending.pop(0)
            path = self.folder / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # removed since the scan: nothing to inspect
            except OSError as exc:
                raise SourceError(f"cannot read folder {self.folder}: {exc}") from exc
            frame_id = f"{_safe_id(Path(name).stem)}-{self._file_digest(name, st)}"
            try:
                image = decode_image_file(path, self.cfg.max_pixels)
            except ImageError as exc:
                return Frame(image=None, frame_id=frame_id, source=str(path), error=str(exc), key=name)
            except OSError as exc:  # vanished or unreadable since the scan: this file is bad, the folder is not
                error = f"{path}: cannot read ({exc.strerror or exc})"
                return Frame(image=None, frame_id=frame_id, source=str(path), error=error, key=name)
            return Frame(image=image, frame_id=frame_id, source=str(path), key=name)
        return None

    @staticmethod
    def _file_digest(name: str, st: os.stat_result) -> str:
        # Same file, same id: a file inspected again after a crash repeats its id, never invents a new one.
        return hashlib.sha256(f"{name}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:10]

    def skip(self) -> None:
        return None  # files wait for us; nothing goes stale

    def done(self, frame: Frame) -> None:
        if frame.key is None or self._log is None:
            return
        self._seen.add(frame.key)
        self._log.write(frame.key + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


def make_source(cfg: AgentConfig, run_id: str) -> FrameSource:
    kind = cfg.source_kind
    src = cfg.capture.source
    if kind == "folder":
        return FolderSource(str(src), cfg.storage_dir, cfg.capture)  # expanded once, by the config
    return VideoCaptureSource(kind, src, cfg.capture, run_id)


@dataclass
class SourceStatus:
    kind: str
    name: str
    state: str = "opening"  # opening | up | down | ended
    error: str | None = None
    failures: int = 0  # consecutive
    reopens: int = 0
    retry_in_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "state": self.state, "error": self.error,
                "reopens": self.reopens}


class ManagedSource:
    """A source that never raises: failures close it, report, and reopen it after a growing wait."""

    def __init__(self, source: FrameSource, cfg: CaptureConfig,
                 on_change: Callable[[SourceStatus], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.cfg = cfg
        self.on_change = on_change
        self.clock = clock
        self.status = SourceStatus(source.kind, source.name)
        self._open = False
        self._next_attempt = 0.0
        self.ever_up = False

    @property
    def up(self) -> bool:
        return self._open

    @property
    def ended(self) -> bool:
        return self.status.state == "ended"

    def backoff(self) -> float:
        n = max(0, self.status.failures - 1)
        return min(self.cfg.reopen_backoff_max_s, self.cfg.reopen_backoff_s * (2 ** min(n, 30)))

    def ensure_open(self) -> bool:
        if self._open:
            return True
        if self.ended or self.clock() < self._next_attempt:
            return False
        try:
            self.source.open()
        except SourceError as exc:
            self._fail(exc)
            return False
        except Exception as exc:  # an unexpected driver error is a failed open like any other
            logger.exception("opening source %s failed unexpectedly", self.status.name)
            self._fail(exc)
            return False
        self._open = True
        if self.ever_up:
            self.status.reopens += 1
        self.ever_up = True
        self._set("up", None)
        return True

    def read(self, fresh: bool = False) -> Frame | None:
        """The next frame, or None when there is none now (empty folder, waiting to reopen, ended)."""
        if not self.ensure_open():
            return None
        try:
            frame = self.source.read(fresh)
        except EndOfSource:
            logger.info("source %s ended (capture.loop is off); idle until stopped", self.status.name)
            self.close()
            self._set("ended", None)
            return None
        except SourceError as exc:
            self._fail(exc)
            return None
        except Exception as exc:  # whatever a driver throws, the service stays up and reopens the source
            logger.exception("source %s failed unexpectedly", self.status.name)
            self._fail(exc)
            return None
        if frame is not None and self.status.failures:
            self.status.failures = 0
        return frame

    @property
    def live(self) -> bool:
        """A camera or stream: frames keep coming whether or not we read them."""
        return self.source.kind in ("device", "stream")

    def skip(self) -> None:
        """Drop one frame of a live source (between inspections under max_fps); failures as in read."""
        if not self._open:
            return
        try:
            self.source.skip()
        except Exception as exc:  # the same boundary as read(): report, reopen later, never raise
            self._fail(exc)

    def done(self, frame: Frame) -> None:
        try:
            self.source.done(frame)
        except OSError as exc:
            # The frame was handled; only the "seen" mark is lost, so it may be inspected again later.
            logger.error("cannot record %s as inspected: %s", frame.key, exc)

    def close(self) -> None:
        if self._open:
            self.source.close()
        self._open = False

    def _fail(self, exc: Exception) -> None:
        self.close()
        self.status.failures += 1
        wait = self.backoff()
        self._next_attempt = self.clock() + wait
        self.status.retry_in_s = wait
        logger.warning("source %s failed: %s; retrying in %.1f s", self.status.name, exc, wait)
        self._set("down", str(exc))

    def _set(self, state: str, error: str | None) -> None:
        changed = state != self.status.state or error != self.status.error
        self.status.state = state
        self.status.error = error
        if state != "down":
            self.status.retry_in_s = None
        if changed and self.on_change is not None:
            self.on_change(self.status)
