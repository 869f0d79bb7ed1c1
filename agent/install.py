"""Bundles installed over MQTT: chunk reassembly, safe staging, shadow scoring, the health gate, installed.json.

A bundle travels as an uncompressed tar of its folder (plain files at the top level only), cut into chunks;
each chunk is one ``cmd/install`` command (see docs/FLEET.md):

    {"id": request id, "transfer": "<id>", "seq": i, "chunks": n, "sha256": "<of the whole tar>",
     "bytes": total, "data": "<base64>", "force": bool, "shadow": bool}

:class:`Reassembler` (frame-loop thread, a few ms per chunk) writes chunks to
``<storage>/bundles/.incoming/<transfer>/``; chunks may come out of order or twice, a transfer that stalls
expires, a new transfer replaces an unfinished one. Once every chunk is there, the install job (a worker
thread, see agent.rollout) joins them, checks the sha256 of the whole, extracts the tar with
:func:`extract_bundle` (refusing links, devices, folders, paths), moves it to
``<storage>/bundles/<name>-<version>-<sha12>/``, loads and verifies it, and shadow-scores the last frames with
it (:func:`shadow_score`). The switch happens on the frame loop; :class:`Watch` judges the first frames after it.
``installed.json`` ({current, previous}) lets an installed bundle survive a restart.

Nothing here touches the scorer in use or MQTT: the service does, on its own thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024  # raw bytes per chunk the pusher sends; a 4 MiB bundle is 16 chunks
ENVELOPE_BYTES = 4096  # the JSON around a chunk's data
MAX_INSTALL_COMMAND_BYTES = 4 * ((CHUNK_BYTES + 2) // 3) + ENVELOPE_BYTES  # base64 of a chunk plus the envelope
TRANSFER_STALL_S = 120.0  # a transfer with no new chunk for this long is dropped (the pusher gave up or died)
BUNDLES_DIR = "bundles"
INCOMING = ".incoming"
INSTALLED_FILE = "installed.json"
TAR_NAME = "bundle.tar"
MANIFEST = "manifest.json"
TRANSFER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MEMBER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # a plain file name: no '/', no '..', not hidden
MAX_MEMBERS = 64  # a bundle has a handful of files
FORGOTTEN_KEPT = 64  # finished, failed or replaced transfer ids remembered, so late chunks of them are ignored


class InstallError(ValueError):
    """An install that cannot go on; the message says what is wrong and what to do."""


# --- the command body (checked on the network thread) -------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_install_body(body: dict[str, Any]) -> str | None:
    """A problem with a cmd/install body, or None. Cheap: the data is not decoded here."""
    transfer = body.get("transfer")
    if not isinstance(transfer, str) or not TRANSFER_RE.match(transfer):
        return "'transfer' must be 1-64 letters, digits, '_' or '-' (the same for every chunk of one bundle)"
    chunks, seq, total = body.get("chunks"), body.get("seq"), body.get("bytes")
    if not _is_int(chunks) or chunks < 1:
        return "'chunks' must be a whole number >= 1 (how many chunks the bundle was cut into)"
    if not _is_int(seq) or not 0 <= seq < chunks:
        return f"'seq' must be a whole number from 0 to chunks - 1 ({chunks - 1})"
    if not _is_int(total) or total < 1:
        return "'bytes' must be a whole number >= 1 (the size of the whole tar)"
    if not isinstance(body.get("sha256"), str) or not SHA256_RE.match(body["sha256"]):
        return "'sha256' must be 64 lowercase hex digits (of the whole tar)"
    if not isinstance(body.get("data"), str):
        return "'data' must be a base64 string (this chunk's bytes)"
    for name in ("force", "shadow"):
        if name in body and not isinstance(body[name], bool):
            return f"'{name}' must be true or false"
    return None


def install_chunks(tar: bytes, transfer: str, *, force: bool = False, shadow: bool = True,
                   chunk_bytes: int = CHUNK_BYTES) -> list[dict[str, Any]]:
    """The cmd/install bodies (without ``id``) that carry ``tar``: what ``yugami-fleet push`` sends."""
    digest = hashlib.sha256(tar).hexdigest()
    pieces = [tar[i:i + chunk_bytes] for i in range(0, len(tar), chunk_bytes)] or [b""]
    return [{"transfer": transfer, "seq": i, "chunks": len(pieces), "sha256": digest, "bytes": len(tar),
             "force": force, "shadow": shadow, "data": base64.b64encode(piece).decode("ascii")}
            for i, piece in enumerate(pieces)]


def bundle_tar(bundle_dir: str | Path) -> bytes:
    """The bundle folder as an uncompressed tar: its plain files at the top level, sorted, with neutral owner
    and times (the same folder gives the same bytes). Hidden files are left out; a folder or link inside the
    bundle is an error (the agent would refuse it)."""
    root = Path(bundle_dir)
    if not (root / MANIFEST).is_file():
        raise InstallError(f"{root} is not a bundle folder (no {MANIFEST}); give the folder yugami-train wrote")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_symlink() or not path.is_file() or not MEMBER_RE.match(path.name):
                raise InstallError(f"{path}: a bundle holds plain files only (no folders, links or odd names); "
                                   "move it out of the bundle folder")
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --- reassembly (frame-loop thread) -------------------------------------------------------------------


@dataclass
class Transfer:
    """One bundle on its way in."""

    transfer: str
    chunks: int
    sha256: str
    total: int
    folder: Path
    request_id: Any = None
    force: bool = False
    shadow: bool = True
    received: dict[int, int] = field(default_factory=dict)  # seq -> bytes
    started: float = 0.0
    touched: float = 0.0
    announced: bool = False  # install_started was sent

    @property
    def complete(self) -> bool:
        return len(self.received) == self.chunks

    @property
    def received_bytes(self) -> int:
        return sum(self.received.values())

    def describe(self) -> dict[str, Any]:
        return {"transfer": self.transfer, "chunks": self.chunks, "received": len(self.received),
                "bytes": self.total, "sha256": self.sha256}


@dataclass
class ChunkResult:
    """What one chunk did: ``status`` is ``partial``, ``complete`` or ``ignored`` (a chunk of a transfer that
    is over); ``replaced`` is an unfinished transfer this one displaced (its sender should hear why)."""

    status: str
    transfer: Transfer | None = None
    replaced: Transfer | None = None


class Reassembler:
    """Chunks to a folder of parts, one transfer at a time, bounded by ``max_bytes``."""

    def __init__(self, incoming: Path, max_bytes: int, stall_s: float = TRANSFER_STALL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.incoming = incoming
        self.max_bytes = max_bytes
        self.stall_s = stall_s
        self.clock = clock
        self.current: Transfer | None = None
        self._over: deque[str] = deque(maxlen=FORGOTTEN_KEPT)

    def clear_leftovers(self) -> None:
        """Remove what a previous run left half-received (called once at start)."""
        if self.incoming.is_dir():
            for path in self.incoming.iterdir():
                remove_tree(path)

    def add(self, body: dict[str, Any], request_id: Any = None) -> ChunkResult:
        """Take one chunk (body already checked by :func:`check_install_body`). Raises InstallError for a
        chunk that breaks its transfer; the transfer is then dropped and its later chunks ignored."""
        tid = body["transfer"]
        if tid in self._over:
            return ChunkResult("ignored")
        replaced = None
        if self.current is not None and self.current.transfer != tid:
            replaced = self.current
            self.drop(replaced)
        if self.current is None:
            self.current = self._start(body, request_id)
        t = self.current
        try:
            self._take(t, body)
        except InstallError:
            self.drop(t)
            raise
        if t.complete:
            self.current = None  # handed over: the install job owns its folder now
            self._over.append(t.transfer)
            return ChunkResult("complete", t, replaced)
        return ChunkResult("partial", t, replaced)

    def _start(self, body: dict[str, Any], request_id: Any) -> Transfer:
        tid, total, chunks = body["transfer"], body["bytes"], body["chunks"]
        if total > self.max_bytes:
            self._over.append(tid)
            raise InstallError(f"the bundle is {total} bytes, over fleet.max_bundle_bytes ({self.max_bytes}); "
                               "raise that limit on the box or send a smaller bundle")
        if chunks > total:
            self._over.append(tid)
            raise InstallError(f"{chunks} chunks for {total} bytes cannot be; the sender is broken")
        folder = self.incoming / tid
        remove_tree(folder)
        folder.mkdir(parents=True)
        return Transfer(tid, chunks, body["sha256"], total, folder, request_id=request_id,
                        force=bool(body.get("force", False)), shadow=bool(body.get("shadow", True)),
                        started=self.clock(), touched=self.clock())

    def _take(self, t: Transfer, body: dict[str, Any]) -> None:
        if (body["chunks"], body["sha256"], body["bytes"]) != (t.chunks, t.sha256, t.total):
            raise InstallError(f"chunk {body['seq']} of transfer {t.transfer} disagrees with the first chunk on "
                               "chunks / sha256 / bytes; push the bundle again")
        try:
            data = base64.b64decode(body["data"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InstallError(f"chunk {body['seq']} of transfer {t.transfer}: 'data' is not base64 ({exc})") from exc
        seq = body["seq"]
        if t.received_bytes - t.received.get(seq, 0) + len(data) > t.total:
            raise InstallError(f"transfer {t.transfer}: the chunks hold more than the {t.total} bytes announced; "
                               "push the bundle again")
        (t.folder / f"{seq:06d}.part").write_bytes(data)  # a repeated chunk overwrites itself
        t.received[seq] = len(data)
        t.touched = self.clock()
        if t.complete and t.received_bytes != t.total:
            raise InstallError(f"transfer {t.transfer}: {t.received_bytes} bytes arrived, {t.total} were announced; "
                               "push the bundle again")

    def is_over(self, transfer: str) -> bool:
        """A transfer that was finished, refused or replaced: its late chunks get no answer."""
        return transfer in self._over

    def refuse(self, transfer: str) -> None:
        """Mark a transfer refused before any of it was kept (its other chunks are then ignored)."""
        if self.current is not None and self.current.transfer == transfer:
            self.drop(self.current)
        elif transfer not in self._over:
            self._over.append(transfer)

    def drop(self, t: Transfer) -> None:
        """Forget a transfer and remove its parts; later chunks of it are ignored."""
        if self.current is t:
            self.current = None
        self._over.append(t.transfer)
        remove_tree(t.folder)

    def expire(self, now: float | None = None) -> Transfer | None:
        """The current transfer if it stalled (and is now dropped), else None."""
        t = self.current
        if t is None:
            return None
        if (self.clock() if now is None else now) - t.touched < self.stall_s:
            return None
        self.drop(t)
        return t


# --- the install job's file work (worker thread) ------------------------------------------------------


def assemble(t: Transfer) -> Path:
    """Join the parts into ``<folder>/bundle.tar`` and check the sha256 of the whole; InstallError if it
    does not match (the parts are removed either way)."""
    out = t.folder / TAR_NAME
    digest = hashlib.sha256()
    size = 0
    with open(out, "wb") as f:
        for seq in range(t.chunks):
            part = t.folder / f"{seq:06d}.part"
            data = part.read_bytes()
            digest.update(data)
            size += len(data)
            f.write(data)
            part.unlink()
    actual = digest.hexdigest()
    if actual != t.sha256 or size != t.total:
        raise InstallError(f"the bundle arrived damaged: sha256 {actual[:12]}... ({size} bytes), the sender said "
                           f"{t.sha256[:12]}... ({t.total} bytes); push it again")
    return out


def _member_problem(m: tarfile.TarInfo) -> str | None:
    if not m.isreg():
        kind = ("a link" if m.issym() or m.islnk() else "a folder" if m.isdir()
                else "a device or fifo" if m.isdev() or m.isfifo() else "not a plain file")
        return f"{m.name!r} is {kind}; a bundle holds plain files only"
    if not MEMBER_RE.match(m.name) or m.name in (".", ".."):
        return f"{m.name!r} is not a plain file name at the top level (no '/', '..' or hidden names)"
    return None


def extract_bundle(tar_path: Path, dest: Path, max_bytes: int) -> list[str]:
    """Extract a bundle tar into the new folder ``dest``: plain files at the top level only, ``max_bytes`` in
    all. Anything else (links, devices, folders, paths with '/' or '..', duplicates) refuses the whole tar
    before a byte is written. Returns the file names."""
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise InstallError(f"the tar holds {len(members)} entries; a bundle has a handful of files")
            names: set[str] = set()
            for m in members:
                problem = _member_problem(m)
                if problem is None and m.name in names:
                    problem = f"{m.name!r} is in the tar twice"
                if problem:
                    raise InstallError(f"bundle refused: {problem}")
                names.add(m.name)
            if sum(m.size for m in members) > max_bytes:
                raise InstallError(f"the files hold more than fleet.max_bundle_bytes ({max_bytes}) in all")
            if MANIFEST not in names:
                raise InstallError(f"the tar has no {MANIFEST}; send a bundle folder written by yugami-train")
            dest.mkdir(parents=True)
            for m in members:
                src = tar.extractfile(m)
                assert src is not None  # a regular member always has a file object
                with src, open(dest / m.name, "xb") as f:
                    shutil.copyfileobj(src, f)
    except tarfile.TarError as exc:
        raise InstallError(f"the bundle is not a readable tar ({exc}); push it again with yugami-fleet push") from exc
    return sorted(names)


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip(".")[:limit] or "bundle"


def manifest_identity(folder: Path) -> tuple[str, str]:
    """(model name, version) from a staged manifest, for the folder's name only (the loader checks the rest)."""
    try:
        model = json.loads((folder / MANIFEST).read_bytes()).get("model") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise InstallError(f"{MANIFEST} is not valid JSON ({exc}); re-export the bundle with yugami-train") from exc
    if not isinstance(model, dict):
        model = {}
    return str(model.get("name") or "bundle"), str(model.get("version") if model.get("version") is not None else "0")


def stage(t: Transfer, bundles: Path, max_bytes: int) -> Path:
    """Assemble, check and extract a complete transfer; move it to ``bundles/<name>-<version>-<sha12>/``. The
    transfer's folder is removed whatever happens. A folder of that name already there (the same bundle
    pushed again) is used as it is."""
    try:
        tar_path = assemble(t)
        unpacked = t.folder / "bundle"
        extract_bundle(tar_path, unpacked, max_bytes)
        name, version = manifest_identity(unpacked)
        final = bundles / f"{_slug(name, 64)}-{_slug(version, 32)}-{t.sha256[:12]}"
        if not final.exists():
            os.replace(unpacked, final)
        return final
    finally:
        remove_tree(t.folder)


def remove_tree(path: Path) -> bool:
    """Remove a file or folder; nothing there is no error. Clean-up, also on the frame loop (a stalled or
    replaced transfer, old bundles after a switch): a disk that refuses (read-only, I/O error) is logged and the
    thing left there, never raised. True when it is gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot remove %s (%s); left on the disk", path, exc)
        return False
    return True


# --- shadow scoring and the health gate ---------------------------------------------------------------


@dataclass(frozen=True)
class Shadow:
    """How a bundle judged recent frames, beside how the bundle in use judged them."""

    frames: int
    anomalies: int
    old_anomalies: int
    errors: int = 0

    @property
    def share(self) -> float | None:
        return self.anomalies / self.frames if self.frames else None

    @property
    def old_share(self) -> float | None:
        return self.old_anomalies / self.frames if self.frames else None

    def as_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {"frames": self.frames, "anomalies": self.anomalies, "anomaly_share": r(self.share),
                "old_anomaly_share": r(self.old_share), "errors": self.errors}


def shadow_score(score: Callable[[Any], str], frames: Sequence[Any]) -> Shadow:
    """Score each kept frame (``KeptFrame``: image + the verdict the bundle in use gave) with ``score`` (the new
    bundle's verdict for an image). A frame the new bundle cannot score counts as anomalous."""
    anomalies = old = errors = 0
    for kept in frames:
        old += int(kept.payload.get("verdict") == "anomaly")
        try:
            verdict = score(kept.image)
        except Exception as exc:  # one unscorable frame is a finding, not a crash of the install
            logger.warning("shadow scoring frame %s failed: %s", kept.frame_id, exc)
            errors += 1
            verdict = "anomaly"
        anomalies += int(verdict == "anomaly")
    return Shadow(len(frames), anomalies, old, errors)


def gate_problem(shadow: Shadow, max_share: float) -> str | None:
    """Why the shadow scores fail the health gate, or None."""
    share = shadow.share
    if share is None or share <= max_share:
        return None
    return (f"health gate: the new bundle calls {shadow.anomalies} of the last {shadow.frames} frames anomalous "
            f"(share {share:.2f} > fleet.max_anomaly_share {max_share:g}; the bundle in use: "
            f"{shadow.old_anomalies} of {shadow.frames})")


class Watch:
    """The first ``frames`` verdicts after a switch: fails as soon as more than ``max_share`` of them are
    anomalous (once that many anomalies are in, later ok frames cannot save it)."""

    def __init__(self, frames: int, max_share: float) -> None:
        self.frames = frames
        self.max_share = max_share
        self.seen = 0
        self.anomalies = 0

    def add(self, anomaly: bool) -> str | None:
        """'failed', 'passed', or None while still watching."""
        self.seen += 1
        self.anomalies += int(anomaly)
        if self.anomalies > self.max_share * self.frames:
            return "failed"
        return "passed" if self.seen >= self.frames else None

    def reason(self) -> str:
        return (f"watch: {self.anomalies} of the first {self.seen} frames after the switch were anomalous (more than "
                f"fleet.max_anomaly_share {self.max_share:g} of fleet.watch_frames {self.frames})")


@dataclass
class JobOutcome:
    """What an install or rollback job (worker thread) hands back to the frame loop."""

    kind: str  # "install" or "rollback"
    ok: bool
    error: str | None = None
    scorer: Any = None  # agent.scoring.Scorer, ready to switch in
    path: Path | None = None  # the bundle folder it was loaded from
    transfer: Transfer | None = None
    shadow: Shadow | None = None
    times: dict[str, float] = field(default_factory=dict)
    pending: Any = None  # agent.commands.Pending to answer, set by the runner


# --- installed.json -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """Which bundle folders are in use and kept for rollback; ``config_bundle`` is cfg.bundle when they were
    written (a config pointing elsewhere since means the operator chose another bundle: it wins)."""

    current: Path
    previous: Path | None
    config_bundle: str | None = None


def _entry(bundles: Path, path: Path | None) -> str | None:
    """A folder inside ``bundles`` by its name (the state dir may move), any other by its absolute path."""
    if path is None:
        return None
    path = Path(path)
    return path.name if path.parent == bundles else str(path.resolve())


def _resolve(bundles: Path, entry: Any) -> Path | None:
    if not isinstance(entry, str) or not entry:
        return None
    p = Path(entry)
    return p if p.is_absolute() else bundles / p


def read_installed(bundles: Path) -> tuple[Installed | None, str | None]:
    """(the state, None), (None, None) when there is none, or (None, why it cannot be used)."""
    path = bundles / INSTALLED_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path} cannot be read ({type(exc).__name__}: {exc})"
    current = _resolve(bundles, doc.get("current")) if isinstance(doc, dict) else None
    if current is None:
        return None, f"{path} names no current bundle"
    previous = _resolve(bundles, doc.get("previous"))
    config_bundle = doc.get("config_bundle") if isinstance(doc.get("config_bundle"), str) else None
    return Installed(current, previous, config_bundle), None


def write_installed(bundles: Path, state: Installed) -> None:
    """Write installed.json atomically (temporary file, fsync, rename): old or new, never half. Raises OSError."""
    bundles.mkdir(parents=True, exist_ok=True)
    doc = {"current": _entry(bundles, state.current), "previous": _entry(bundles, state.previous),
           "config_bundle": state.config_bundle}
    from agent.storage import write_atomic  # here: the rest of this module is standard library only

    write_atomic(bundles / INSTALLED_FILE, (json.dumps(doc, indent=1) + "\n").encode("utf-8"), sync=True)


def prune(bundles: Path, keep: int, protect: Iterable[Path | None]) -> list[Path]:
    """Remove the oldest installed bundle folders beyond ``keep`` (the protected ones, in use and previous,
    always stay and count). Returns what was removed."""
    kept = {Path(p).resolve() for p in protect if p is not None}
    try:
        folders = [p for p in bundles.iterdir()
                   if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    except OSError:
        return []
    others = sorted((p for p in folders if p.resolve() not in kept), key=lambda p: p.stat().st_mtime, reverse=True)
    room = max(0, keep - len([p for p in folders if p.resolve() in kept]))
    return [p for p in others[room:] if remove_tree(p)]
