"""Frames back to the workstation: what ``cmd/collect_list`` lists and ``cmd/fetch`` reads, in chunks.

Two stores hold frames on the box:

- labelled frames (``cmd/feedback``): ``<storage>/feedback/<frame id>.png`` + ``.json``
  ({"frame_id", "label", "note", "ts", "verdict", ...}; agent.feedback writes them);
- evidence (agent.storage): ``<storage>/evidence/<day>/<HHMMSS>_<frame id>.<jpg|png>`` + ``.json`` (the
  verdict). An evidence frame that also has a label is listed once, with its label.

A listing item names the frame's files with their size and sha256; ``cmd/fetch`` reads one of them from an
offset, at most :data:`MAX_FETCH_BYTES` at a time, so an answer fits the broker and the frame loop turn
stays short. Only the files a listing names can be read: a name with a path part is refused before any
lookup, and the lookup goes through the listing, never through the file system with the caller's text.

Handlers run on the frame loop: a listing hashes files through a cache (a file is hashed once while its
inode, size and mtime stay) and stops after :data:`LIST_BUDGET_S` of work, saying ``more: true`` with a ``next``
cursor to continue from.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.mqtt import parse_utc_iso, utc_iso

logger = logging.getLogger(__name__)

LABELS = ("good", "defect", "unlabelled")
MAX_FETCH_BYTES = 256 * 1024  # raw bytes per cmd/fetch answer (base64 makes the message a third larger)
LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 500
LIST_BUDGET_S = 0.2  # hashing time per listing; beyond it the answer says more: true
HASH_CACHE_MAX = 4096
IMAGE_SUFFIXES = (".png", ".jpg")


class CollectError(ValueError):
    """A listing or fetch that cannot be answered; the message says why and what to send instead."""


@dataclass(frozen=True)
class StoredFrame:
    """One frame on the box and the files a client may read."""

    frame_id: str
    label: str  # good | defect | unlabelled
    t: float  # epoch seconds: labelled at (feedback) or saved at (evidence)
    store: str  # "feedback" | "evidence"
    files: dict[str, Path]  # name offered to the client -> where it may be (stat'ed only when listed or read)
    note: str | None = None


# --- bodies (checked on the network thread, through agent.commands.TABLE) ---------------------------


def check_list_body(body: dict[str, Any]) -> str | None:
    since = body.get("since")
    if since is not None:
        if not isinstance(since, str):
            return "'since' must be an ISO 8601 time such as 2026-01-31T12:00:00Z, or null"
        try:
            parse_time(since)
        except ValueError as exc:
            return str(exc)
    labels = body.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            return f"'labels' must be a non-empty list of {', '.join(LABELS)}"
        unknown = sorted(set(labels) - set(LABELS))
        if unknown:
            return f"'labels': unknown {', '.join(map(repr, unknown))}; use {', '.join(LABELS)}"
    limit = body.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        return f"'limit' must be a whole number from 1 (at most {LIST_LIMIT_MAX} are listed per answer)"
    after = body.get("after")
    if after is not None and (not isinstance(after, str) or parse_cursor(after) is None):
        return "'after' must be the 'next' cursor of an earlier collect_list answer"
    return None


def check_fetch_body(body: dict[str, Any]) -> str | None:
    fid = body.get("frame_id")
    if not isinstance(fid, str) or not fid:
        return "'frame_id' must be a frame id from collect_list"
    problem = file_name_problem(body.get("file"))
    if problem:
        return problem
    for key in ("offset", "length"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"'{key}' must be a whole number of bytes, 0 or more"
    return None


def file_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a file of a frame (a bare name from its listing), or None."""
    if not isinstance(name, str) or not name:
        return "'file' must be one of the frame's file names from collect_list"
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or len(name) > 255:
        return f"'file' {name[:80]!r} must be a bare file name from collect_list (no folders)"
    return None


def parse_time(text: str) -> float:
    """ISO 8601 (``Z`` or an offset; none means UTC) -> epoch seconds; ValueError saying the form."""
    t = parse_utc_iso(text)
    if t is None:
        raise ValueError(f"'since' {text!r} is not an ISO 8601 time; send e.g. 2026-01-31T12:00:00Z")
    return t


def cursor_of(frame: StoredFrame) -> str:
    return f"{round(frame.t * 1000)}:{frame.frame_id}"


def parse_cursor(text: str) -> tuple[int, str] | None:
    ms, sep, fid = text.partition(":")
    if not sep or not fid or not ms.isdigit():
        return None
    return int(ms), fid


# --- the stores --------------------------------------------------------------------------------------


def labelled_frames(entries: Iterable[Any]) -> list[StoredFrame]:
    """Labelled frames from the feedback store's entries (agent.feedback.FeedbackEntry: frame_id, label, ts,
    note, files), which it keeps in memory: no file is opened."""
    out = []
    for e in entries:
        if e.label not in ("good", "defect") or file_name_problem(e.frame_id):
            continue
        try:
            t = parse_time(e.ts)
        except ValueError:
            t = 0.0
        out.append(StoredFrame(e.frame_id, e.label, t, "feedback", dict(e.files), e.note or None))
    return out


def evidence_frames(entries: Iterable[tuple[float, Path]], labelled: set[str]) -> list[StoredFrame]:
    """Evidence frames without a label; ``entries`` are (time saved, path without suffix) as agent.storage
    indexes them, the name being ``<HHMMSS>_<frame id>``; cheap: no file is opened."""
    out = []
    for t, base in entries:
        _, sep, fid = base.name.partition("_")
        if not sep or not fid or fid in labelled:
            continue
        files = {base.name + s: base.with_name(base.name + s) for s in (*IMAGE_SUFFIXES, ".json")}
        out.append(StoredFrame(fid, "unlabelled", t, "evidence", files))
    return out


# --- hashing -----------------------------------------------------------------------------------------


class HashCache:
    """sha256 of files, kept while a file's inode, size and mtime stay the same (bounded, oldest out first).

    Both stores write by rename, so a rewritten file is a new inode even within one mtime tick."""

    def __init__(self, capacity: int = HASH_CACHE_MAX) -> None:
        self.capacity = capacity
        self._known: OrderedDict[Path, tuple[int, int, int, str]] = OrderedDict()

    def stat_and_hash(self, path: Path) -> tuple[int, str]:
        """(bytes, sha256 hex); OSError if the file is gone."""
        st = path.stat()
        known = self._known.get(path)
        if known is not None and known[:3] == (st.st_ino, st.st_size, st.st_mtime_ns):
            self._known.move_to_end(path)
            return st.st_size, known[3]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        self._known[path] = (st.st_ino, st.st_size, st.st_mtime_ns, value)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)
        return st.st_size, value

    def cached(self, path: Path) -> bool:
        return path in self._known


# --- the answers -------------------------------------------------------------------------------------


class Collector:
    """Answers cmd/collect_list and cmd/fetch from the two stores.

    ``labelled()`` gives the feedback store's entries and ``evidence()`` the evidence index's (time, base)
    pairs, both kept in memory by the agent; they are read per request (every chunk of a fetch), so the
    evidence frames derived from them are kept until the index changes at either end or a label changes."""

    def __init__(self, labelled: Callable[[], Iterable[Any]], evidence: Callable[[], list[tuple[float, Path]]],
                 clock: Callable[[], float] = time.monotonic, budget_s: float = LIST_BUDGET_S) -> None:
        self.labelled = labelled
        self.evidence = evidence
        self.hashes = HashCache()
        self.clock = clock
        self.budget_s = budget_s
        self._evidence_key: tuple[Any, ...] | None = None
        self._evidence_frames: list[StoredFrame] = []

    def frames(self) -> list[StoredFrame]:
        """Labelled frames, then evidence frames without a label."""
        lab = labelled_frames(self.labelled())
        ids = frozenset(f.frame_id for f in lab)
        entries = self.evidence()
        # The index only grows at its end and is pruned at its start: its length and both ends tell a change.
        key = (len(entries), entries[0] if entries else None, entries[-1] if entries else None, ids)
        if key != self._evidence_key:
            self._evidence_frames, self._evidence_key = evidence_frames(entries, ids), key
        return lab + self._evidence_frames

    def list(self, body: dict[str, Any]) -> dict[str, Any]:
        labels = set(body.get("labels") or LABELS)
        since = parse_time(body["since"]) if body.get("since") else None
        limit = min(int(body.get("limit") or LIST_LIMIT_DEFAULT), LIST_LIMIT_MAX)
        after = parse_cursor(body["after"]) if body.get("after") else None
        chosen = sorted((f for f in self.frames() if f.label in labels and (since is None or f.t >= since)),
                        key=lambda f: (round(f.t * 1000), f.frame_id))
        if after is not None:
            chosen = [f for f in chosen if (round(f.t * 1000), f.frame_id) > after]
        deadline = self.clock() + self.budget_s
        items: list[dict[str, Any]] = []
        done = 0  # frames of ``chosen`` looked at (a frame whose files vanished is passed over)
        for frame in chosen:
            if len(items) >= limit or (done and self.clock() > deadline):
                break
            item = self._item(frame)
            done += 1
            if item is not None:
                items.append(item)
        more = done < len(chosen)
        out: dict[str, Any] = {"items": items, "more": more}
        if more:
            out["next"] = cursor_of(chosen[done - 1]) if done else body.get("after")
        return out

    def _item(self, frame: StoredFrame) -> dict[str, Any] | None:
        files = {}
        for name, path in sorted(frame.files.items()):
            try:
                size, sha = self.hashes.stat_and_hash(path)
            except OSError:  # not written in that format, or removed by retention since it was indexed
                continue
            files[name] = {"bytes": size, "sha256": sha}
        if not any(n.endswith(IMAGE_SUFFIXES) for n in files):
            return None
        item: dict[str, Any] = {"frame_id": frame.frame_id, "label": frame.label, "ts": utc_iso(frame.t),
                                "store": frame.store, "files": files}
        if frame.note:
            item["note"] = frame.note
        return item

    def fetch(self, body: dict[str, Any]) -> dict[str, Any]:
        fid, name = body["frame_id"], body["file"]
        frame = next((f for f in self.frames() if f.frame_id == fid), None)
        if frame is None:
            raise CollectError(f"frame {fid!r} is not on this box (any more): evidence retention may have removed "
                               "it; list again with collect_list")
        path = frame.files.get(name)
        if path is None or not path.is_file():
            present = sorted(n for n, p in frame.files.items() if p.is_file())
            raise CollectError(f"frame {fid!r} has no file {name!r}; its files: {', '.join(present) or 'none'}")
        offset = int(body.get("offset") or 0)
        length = min(int(body.get("length") or MAX_FETCH_BYTES), MAX_FETCH_BYTES)
        try:
            size, sha = self.hashes.stat_and_hash(path)
            if offset > size:
                raise CollectError(f"offset {offset} is past the end of {name} ({size} bytes)")
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as exc:
            raise CollectError(f"{name} of frame {fid!r} cannot be read ({exc.strerror or exc}); list again") from exc
        return {"frame_id": fid, "file": name, "offset": offset, "bytes_total": size, "sha256": sha,
                "data": base64.b64encode(data).decode("ascii"), "eof": offset + len(data) >= size}


