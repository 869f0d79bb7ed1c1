"""``yugami-fleet collect``: labelled frames and evidence from the boxes into a data folder for yugami-train.

For each box: ``cmd/collect_list`` (paged), then every listed frame's picture and JSON with ``cmd/fetch``, in
chunks of at most 256 KiB, a few in flight at once, each chunk asked again if its answer does not come. A
picture is written to ``<name>.part`` first, in order, and renamed once its sha256 matches the listing's: a
run cut short continues a ``.part`` at its length, and a picture already there with the right sha256 is not
fetched again (nor is a frame whose record in ``collected.json`` is current), so a second run transfers nothing
new. The layout is the one yugami-train and yugami-eval read (trainer.data):

    DATA_DIR/train/good/<device>_<frame id>.<ext>     labelled good (the operator's "false alarm")
    DATA_DIR/test/defect/<device>_<frame id>.<ext>    labelled defect
    DATA_DIR/unlabelled/<device>_<frame id>.<ext>     evidence nobody labelled (look, then move)
    DATA_DIR/collected.json                           where every frame came from, with its verdict

A frame whose label changed on the box since the last run is moved to its new place. yugami-eval needs
``test/good`` as well: collect into the data folder the bundle was trained from (it has one), copy it there,
or pass ``--test-good`` to put the good frames there too.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from agent.collect import LABELS, MAX_FETCH_BYTES, file_name_problem, parse_time
from agent.mqtt import utc_iso
from fleet import mqtt as fm
from fleet.table import columns

logger = logging.getLogger(__name__)

MANIFEST = "collected.json"
MANIFEST_FORMAT = 1
LIST_PAGE = 200
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PLACES = {"good": ("train", "good"), "defect": ("test", "defect"), "unlabelled": ("unlabelled",)}
TEST_GOOD = ("test", "good")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class DeviceSilent(RuntimeError):
    """A box did not answer a request, even after the retries."""


class FrameError(RuntimeError):
    """One frame could not be collected (the box refused, the bytes did not match); the others go on."""


# --- the layout (pure) -------------------------------------------------------------------------------


def safe_part(text: str) -> str:
    """A device or frame id as a file-name part: letters, digits, '_', '.', '-' (others become '_')."""
    out = _UNSAFE.sub("_", text).lstrip(".")
    return out or "_"


def target_path(out: Path, device: str, frame_id: str, label: str, ext: str) -> Path:
    """Where a frame goes in the data folder (PLACES), named ``<device>_<frame id><ext>``."""
    if label not in PLACES:
        raise ValueError(f"unknown label {label!r}; known: {', '.join(PLACES)}")
    return out.joinpath(*PLACES[label], f"{safe_part(device)}_{safe_part(frame_id)}{ext.lower()}")


def eval_good_path(out: Path, device: str, frame_id: str, ext: str) -> Path:
    return out.joinpath(*TEST_GOOD, f"{safe_part(device)}_{safe_part(frame_id)}{ext.lower()}")


def picture_of(item: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The (file name, {bytes, sha256}) of a listed frame's picture; None if it lists none (or a bad name)."""
    for name, meta in sorted((item.get("files") or {}).items()):
        if (name.lower().endswith(IMAGE_SUFFIXES) and not file_name_problem(name) and isinstance(meta, dict)
                and isinstance(meta.get("sha256"), str) and isinstance(meta.get("bytes"), int)):
            return name, meta
    return None


def record_of(item: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The (file name, {bytes, sha256}) of a listed frame's JSON (label record or verdict), if listed."""
    for name, meta in (item.get("files") or {}).items():
        if name.endswith(".json") and not file_name_problem(name) and isinstance(meta, dict):
            return name, meta
    return None


def resume_offset(part: Path, total: int) -> int:
    """Where to continue a ``.part`` file: its length, if not longer than the file (else start again)."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return 0
    if size > total:
        part.unlink()
        return 0
    return size


def sha256_file(path: Path) -> str | None:
    """sha256 hex of a file, None if it is not there."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def parse_since(text: str, now: float | None = None) -> str:
    """``--since``: ISO 8601 (UTC when no offset is given) or an age such as 12h / 7d; -> ISO 8601 UTC."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhd])\s*", text)
    if m:
        t = now - float(m.group(1)) * {"m": 60, "h": 3600, "d": 86400}[m.group(2)]
    else:
        try:
            t = parse_time(text)
        except ValueError:
            raise ValueError(f"--since {text!r}: give an ISO 8601 time (2026-01-31T12:00:00Z) or an age "
                             "(30m, 12h, 7d)") from None
    return utc_iso(t)


def parse_labels(text: str) -> list[str]:
    labels = [x.strip() for x in text.split(",") if x.strip()]
    unknown = sorted(set(labels) - set(LABELS))
    if not labels or unknown:
        raise ValueError(f"--labels {text!r}: give a comma-separated list of {', '.join(LABELS)}")
    return labels


def eval_readiness(out: Path) -> list[str]:
    """What the folder still lacks for yugami-train / yugami-eval (empty: both can run on it)."""
    def images(*parts: str) -> int:
        folder = out.joinpath(*parts)
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0

    missing = []
    good = images("train", "good")
    if good < 4:
        missing.append(f"yugami-train needs at least 4 pictures in train/good/ ({good} now; yugami-eval at least 1): "
                       "copy the normal training pictures the bundle was made from, or collect into that data "
                       "folder (--out)")
    test = out / "test"
    defects = [p.name for p in test.iterdir() if p.is_dir() and p.name != "good" and images("test", p.name)] \
        if test.is_dir() else []
    if not images("test", "good"):
        missing.append("yugami-eval needs test/good/: copy it from the original data folder, collect into that "
                       "folder (--out), or run collect with --test-good to put the good frames there too")
    if not defects:
        missing.append("yugami-eval needs at least one test/<defect type>/ with pictures (label some frames "
                       "'defect', or copy the original test/ defect folders)")
    return missing


# --- collected.json ----------------------------------------------------------------------------------


class Manifest:
    """``collected.json``: one record per ``<device>/<frame id>``, written whole after every frame."""

    def __init__(self, out: Path) -> None:
        self.path = out / MANIFEST
        self.frames: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                doc = json.loads(self.path.read_text(encoding="utf-8"))
                self.frames = dict(doc.get("frames") or {})
            except (OSError, ValueError, AttributeError) as exc:
                raise ValueError(f"{self.path} cannot be read ({exc}); move it aside to start a fresh record "
                                 "(the pictures stay; the next run fetches nothing it already has)") from exc

    @staticmethod
    def key(device: str, frame_id: str) -> str:
        return f"{device}/{frame_id}"

    def get(self, device: str, frame_id: str) -> dict[str, Any] | None:
        return self.frames.get(self.key(device, frame_id))

    def put(self, record: dict[str, Any]) -> None:
        self.frames[self.key(record["device"], record["frame_id"])] = record
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        doc = {"format": MANIFEST_FORMAT, "frames": dict(sorted(self.frames.items()))}
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


# --- requests and answers ----------------------------------------------------------------------------


class Requests:
    """Commands to boxes with several answers awaited at once, matched by request id.

    fleet.mqtt.Results expects one answer per box; a transfer keeps a few chunks of a file in flight, so
    here every request id has its own slot. Answers to ids no longer awaited (a chunk asked again, then both
    came) are dropped."""

    def __init__(self, client: paho.Client, prefix: str, names: tuple[str, ...], devices: list[str]) -> None:
        self.client = client
        self.prefix = prefix
        self._cond = threading.Condition()
        self._waiting: set[str] = set()
        self._answers: dict[str, dict[str, Any]] = {}
        # these boxes only: chunks fetched by someone else from other boxes are not ours to receive
        self.filters = [f"{prefix}/{device}/cmd/{name}/result" for device in devices for name in names]
        for f in self.filters:
            client.message_callback_add(f, self._on_message)
        fm.subscribe(client, self.filters)

    def close(self) -> None:
        for f in self.filters:
            self.client.message_callback_remove(f)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            return
        rid = body.get("request_id") if isinstance(body, dict) else None
        with self._cond:
            if rid in self._waiting:
                self._waiting.discard(rid)
                self._answers[rid] = body
                self._cond.notify_all()

    def send(self, device: str, name: str, body: dict[str, Any]) -> str:
        rid = fm.new_request_id()
        with self._cond:
            self._waiting.add(rid)
        fm.publish_json(self.client, fm.command_topic(self.prefix, device, name), {**body, "id": rid})
        return rid

    def take(self, rids: set[str], timeout: float) -> tuple[str, dict[str, Any]] | None:
        """The answer to one of ``rids`` (the first there), waiting up to ``timeout`` s; None if none came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rid in rids:
                    if rid in self._answers:
                        return rid, self._answers.pop(rid)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def forget(self, rids: set[str]) -> None:
        with self._cond:
            for rid in rids:
                self._waiting.discard(rid)
                self._answers.pop(rid, None)

    def ask(self, device: str, name: str, body: dict[str, Any], timeout: float, retries: int) -> dict[str, Any]:
        """One command and its answer, sent again up to ``retries`` times; DeviceSilent if none comes."""
        for attempt in range(retries + 1):
            rid = self.send(device, name, body)
            got = self.take({rid}, timeout)
            if got is not None:
                return got[1]
            self.forget({rid})
            logger.info("%s: no answer to cmd/%s within %g s (try %d of %d)", device, name, timeout, attempt + 1,
                        retries + 1)
        raise DeviceSilent(f"{device} did not answer cmd/{name} ({retries + 1} tries, {timeout:g} s each): is it "
                           "online (yugami-fleet status), and on this broker and --prefix?")


# --- one box -----------------------------------------------------------------------------------------


@dataclass
class Options:
    out: Path
    since: str | None
    labels: list[str]
    timeout: float = 10.0
    retries: int = 3
    window: int = 4
    chunk: int = MAX_FETCH_BYTES
    test_good: bool = False


@dataclass
class Tally:
    device: str
    answered: bool = False
    listed: int = 0
    fetched: int = 0  # frames whose picture came over the wire (whole or the rest of a .part)
    present: int = 0  # frames already in the folder and current
    moved: int = 0  # frames whose label changed since the last run
    failed: int = 0
    bytes: int = 0  # picture and JSON bytes transferred
    labels: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "answered": self.answered, "listed": self.listed, "fetched": self.fetched,
                "present": self.present, "moved": self.moved, "failed": self.failed, "bytes": self.bytes,
                "labels": self.labels, "errors": self.errors}


class BoxCollector:
    """Lists one box's frames and brings each into the data folder."""

    def __init__(self, requests: Requests, device: str, opts: Options, manifest: Manifest) -> None:
        self.req = requests
        self.device = device
        self.opts = opts
        self.manifest = manifest
        self.tally = Tally(device)

    def run(self) -> Tally:
        try:
            items = self.list_frames()
        except DeviceSilent as exc:
            self.tally.errors.append(str(exc))
            return self.tally
        except FrameError as exc:
            self.tally.answered = True
            self.tally.errors.append(str(exc))
            return self.tally
        self.tally.listed = len(items)
        for n, item in enumerate(items, 1):
            try:
                what = self.collect(item)
            except FrameError as exc:
                self.tally.failed += 1
                self.tally.errors.append(str(exc))
                what = f"FAILED: {exc}"
            except DeviceSilent as exc:
                self.tally.failed += len(items) - n + 1
                self.tally.errors.append(str(exc))
                progress(f"{self.device}: {exc}")
                break
            progress(f"{self.device}: {n}/{len(items)} {item.get('frame_id')} ({item.get('label')}): {what}")
        return self.tally

    def list_frames(self) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"labels": self.opts.labels, "limit": LIST_PAGE}
        if self.opts.since:
            body["since"] = self.opts.since
        items: list[dict[str, Any]] = []
        while True:
            answer = self.req.ask(self.device, "collect_list", body, self.opts.timeout, self.opts.retries)
            self.tally.answered = True
            if not answer.get("ok"):
                raise FrameError(f"{self.device} refused collect_list: {answer.get('error')}")
            items.extend(i for i in answer.get("items") or [] if isinstance(i, dict))
            if not answer.get("more") or not answer.get("next"):
                return items
            body["after"] = answer["next"]

    def collect(self, item: dict[str, Any]) -> str:
        """Bring one listed frame in (or see it is already there); a word on what happened."""
        fid, label = item.get("frame_id"), item.get("label")
        picture = picture_of(item)
        if not isinstance(fid, str) or label not in PLACES or picture is None:
            raise FrameError(f"{self.device}: listing item {str(item)[:120]} has no frame id, label or picture")
        name, meta = picture
        ext = Path(name).suffix
        dest = target_path(self.opts.out, self.device, fid, label, ext)
        old = self.manifest.get(self.device, fid)
        meta_file = record_of(item)
        if self._current(old, dest, meta, meta_file):
            self.tally.present += 1
            self._count(label)
            return "already here"
        moved = self._move_old(old, dest, meta["sha256"])
        got = self.fetch_to_file(fid, name, meta, dest)
        document = self.fetch_json(fid, meta_file) if meta_file else {}
        if old is not None and old.get("file") and self.opts.out / old["file"] != dest:
            (self.opts.out / old["file"]).unlink(missing_ok=True)
            moved = True
        test_copy = self._test_copy(dest, label, fid, ext, old)
        self.manifest.put(self._record(item, document, dest, meta, meta_file, test_copy))
        self._count(label)
        self.tally.moved += int(moved)
        if got:
            self.tally.fetched += 1
            return f"{dest.relative_to(self.opts.out)} ({got} bytes fetched)"
        self.tally.present += 1
        return f"{dest.relative_to(self.opts.out)} (picture already here" + (", moved)" if moved else ")")

    def _count(self, label: str) -> None:
        self.tally.labels[label] = self.tally.labels.get(label, 0) + 1

    def _current(self, old: dict[str, Any] | None, dest: Path, meta: dict[str, Any],
                 meta_file: tuple[str, dict[str, Any]] | None) -> bool:
        """The record and the picture are as the box lists them now: nothing to do."""
        if old is None or old.get("file") != dest.relative_to(self.opts.out).as_posix():
            return False
        if old.get("sha256") != meta["sha256"] or sha256_file(dest) != meta["sha256"]:
            return False
        if meta_file is not None and old.get("record_sha256") != meta_file[1].get("sha256"):
            return False  # the label record changed (a new note): fetch it again
        wanted_copy = self.opts.test_good and old.get("label") == "good"
        return not wanted_copy or bool(old.get("test_copy") and (self.opts.out / old["test_copy"]).is_file())

    def _move_old(self, old: dict[str, Any] | None, dest: Path, sha: str) -> bool:
        """A frame relabelled on the box: move the picture already fetched instead of fetching it again."""
        if old is None or not old.get("file"):
            return False
        src = self.opts.out / old["file"]
        if src == dest or dest.exists() or sha256_file(src) != sha:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        return True

    def _test_copy(self, dest: Path, label: str, fid: str, ext: str, old: dict[str, Any] | None) -> str | None:
        if old and old.get("test_copy") and (label != "good" or not self.opts.test_good):
            (self.opts.out / old["test_copy"]).unlink(missing_ok=True)  # relabelled away from good
        if label != "good" or not self.opts.test_good:
            return None
        copy = eval_good_path(self.opts.out, self.device, fid, ext)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.unlink(missing_ok=True)
        try:
            os.link(dest, copy)  # same bytes, no second copy on disk where the file system allows
        except OSError:
            copy.write_bytes(dest.read_bytes())
        return copy.relative_to(self.opts.out).as_posix()

    def _record(self, item: dict[str, Any], document: dict[str, Any], dest: Path, meta: dict[str, Any],
                meta_file: tuple[str, dict[str, Any]] | None, test_copy: str | None) -> dict[str, Any]:
        labelled = item.get("store") == "feedback"  # its record holds the verdict; evidence's record is one
        verdict = document.get("verdict") if labelled else (document or None)
        return {
            "device": self.device,
            "frame_id": item["frame_id"],
            "label": item["label"],
            "note": item.get("note") or (document.get("note") if labelled else None),
            "labelled_at" if labelled else "saved_at": item.get("ts"),
            "verdict": verdict,
            "file": dest.relative_to(self.opts.out).as_posix(),
            "test_copy": test_copy,
            "sha256": meta["sha256"],
            "bytes": meta["bytes"],
            "source": {"store": item.get("store"), "file": picture_of(item)[0],  # type: ignore[index]
                       "record": meta_file[0] if meta_file else None},
            "record_sha256": meta_file[1].get("sha256") if meta_file else None,
            "collected_at": now_iso(),
        }

    # --- transfers ---

    def fetch_to_file(self, fid: str, name: str, meta: dict[str, Any], dest: Path) -> int:
        """The picture into ``dest`` through ``dest.part``, continued where an earlier run stopped; the bytes
        fetched now (0: it was there already)."""
        size, sha = int(meta["bytes"]), str(meta["sha256"])
        if sha256_file(dest) == sha:
            return 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        start = resume_offset(part, size)
        if start:
            progress(f"{self.device}: {fid}: continuing {part.name} at {start} of {size} bytes")
        fetched = 0
        with open(part, "ab") as f:
            for offset, data in self.chunks(fid, name, size, sha, start):
                assert offset == f.tell(), (offset, f.tell())
                f.write(data)
                fetched += len(data)
                self.tally.bytes += len(data)
        if sha256_file(part) != sha:
            part.unlink()
            raise FrameError(f"{self.device}: {fid}/{name}: sha256 differs from the listing after the transfer; "
                             "the partial file was removed, run collect again")
        os.replace(part, dest)
        return fetched

    def fetch_json(self, fid: str, meta_file: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        name, meta = meta_file
        size, sha = int(meta.get("bytes") or 0), str(meta.get("sha256"))
        raw = b"".join(data for _, data in self.chunks(fid, name, size, sha, 0))
        self.tally.bytes += len(raw)
        if hashlib.sha256(raw).hexdigest() != sha:
            raise FrameError(f"{self.device}: {fid}/{name}: sha256 differs from the listing; run collect again")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise FrameError(f"{self.device}: {fid}/{name} is not JSON ({exc})") from exc
        return doc if isinstance(doc, dict) else {}

    def chunks(self, fid: str, name: str, size: int, sha: str, start: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) from ``start`` to ``size``, in order; up to ``window`` chunks asked at once, each
        asked again (``retries`` times) when its answer does not come within ``timeout``."""
        step = max(1, min(self.opts.chunk, MAX_FETCH_BYTES))
        offsets = list(range(start, size, step))
        sent: dict[str, tuple[int, int, float]] = {}  # request id -> (offset, tries, sent at)
        got: dict[int, bytes] = {}
        queue = iter(offsets)
        following = start  # the offset to hand out next

        def ask(offset: int, tries: int) -> None:
            body = {"frame_id": fid, "file": name, "offset": offset, "length": step}
            sent[self.req.send(self.device, "fetch", body)] = (offset, tries, time.monotonic())

        try:
            for offset in offsets[: self.opts.window]:
                ask(offset, 1)
                next(queue)
            while following < size:
                if following in got:
                    data = got.pop(following)
                    yield following, data
                    following += len(data)
                    nxt = next(queue, None)
                    if nxt is not None:
                        ask(nxt, 1)
                    continue
                answer = self.req.take(set(sent), self._wait_left(sent))
                if answer is None:
                    self._ask_again(sent, ask)
                    continue
                offset, _, _ = sent.pop(answer[0])
                got[offset] = self._chunk_data(answer[1], fid, name, size, sha, offset, step)
        finally:
            self.req.forget(set(sent))

    def _wait_left(self, sent: dict[str, tuple[int, int, float]]) -> float:
        if not sent:
            return 0.0
        oldest = min(t for _, _, t in sent.values())
        return max(0.0, oldest + self.opts.timeout - time.monotonic())

    def _ask_again(self, sent: dict[str, tuple[int, int, float]], ask: Any) -> None:
        now = time.monotonic()
        for rid, (offset, tries, t) in list(sent.items()):
            if now - t < self.opts.timeout:
                continue
            del sent[rid]
            self.req.forget({rid})
            if tries > self.opts.retries:
                raise DeviceSilent(f"{self.device} did not answer cmd/fetch at offset {offset} ({tries} tries, "
                                   f"{self.opts.timeout:g} s each); run collect again to continue where it stopped")
            logger.info("%s: chunk at %d not answered within %g s; asking again", self.device, offset,
                        self.opts.timeout)
            ask(offset, tries + 1)

    def _chunk_data(self, answer: dict[str, Any], fid: str, name: str, size: int, sha: str, offset: int,
                    step: int) -> bytes:
        if not answer.get("ok"):
            raise FrameError(f"{self.device}: {fid}/{name}: {answer.get('error')}")
        if answer.get("sha256") != sha or answer.get("bytes_total") != size:
            raise FrameError(f"{self.device}: {fid}/{name} changed on the box since it was listed; run collect again")
        try:
            data = base64.b64decode(answer.get("data") or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FrameError(f"{self.device}: {fid}/{name}: a chunk is not base64 ({exc})") from exc
        if answer.get("offset") != offset or len(data) != min(step, size - offset):
            raise FrameError(f"{self.device}: {fid}/{name}: chunk at {offset} has {len(data)} bytes, expected "
                             f"{min(step, size - offset)}")
        return data


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("Layout: train/good/ (labelled good), test/defect/ (labelled defect), unlabelled/ (evidence), "
                     "collected.json.\nThen: yugami-train DATA_DIR --out runs/v2 --model-version 2 --sign-key KEY; "
                     "yugami-eval runs/v2 DATA_DIR;\nyugami-fleet push runs/v2 --group LINE. See docs/TRAINING.md.")
    parser.add_argument("--device", nargs="+", required=True, metavar="ID", help="the boxes to collect from")
    parser.add_argument("--out", type=Path, required=True, metavar="DATA_DIR",
                        help="data folder to write into (an existing MVTec-layout folder is added to)")
    parser.add_argument("--since", metavar="TIME", help="only frames labelled or saved since: ISO 8601 or an age "
                        "(12h, 7d); default: all")
    parser.add_argument("--labels", default=",".join(LABELS), metavar="LIST",
                        help=f"which frames (default {','.join(LABELS)})")
    parser.add_argument("--test-good", action="store_true",
                        help="also put good frames into test/good/ so yugami-eval runs on this folder alone (it then "
                        "scores frames a retrained bundle has seen: judge the bundle in use with it, not a new one)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for each answer before asking again (default 10)")
    parser.add_argument("--retries", type=int, default=3, help="times a request is asked again (default 3)")
    parser.add_argument("--window", type=int, default=4, help="chunks of a file in flight at once (default 4)")
    parser.add_argument("--chunk-bytes", type=int, default=MAX_FETCH_BYTES, metavar="N",
                        help=f"bytes per chunk (default and most: {MAX_FETCH_BYTES})")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    fm.add_broker_arguments(parser)


def options_from(args: argparse.Namespace) -> Options:
    if args.timeout <= 0 or args.retries < 0 or args.window < 1 or args.chunk_bytes < 1:
        raise ValueError("--timeout > 0, --retries >= 0, --window >= 1 and --chunk-bytes >= 1 are required")
    return Options(out=args.out, since=parse_since(args.since) if args.since else None,
                   labels=parse_labels(args.labels), timeout=args.timeout, retries=args.retries,
                   window=args.window, chunk=min(args.chunk_bytes, MAX_FETCH_BYTES), test_good=args.test_good)


def table(tallies: list[Tally]) -> str:
    head = ("device", "answered", "listed", "fetched", "present", "moved", "failed", "bytes", "labels")
    rows = [head] + [(t.device, "yes" if t.answered else "NO", str(t.listed), str(t.fetched), str(t.present),
                      str(t.moved), str(t.failed), str(t.bytes),
                      " ".join(f"{k}={v}" for k, v in sorted(t.labels.items())) or "-") for t in tallies]
    return columns(rows)


def run(args: argparse.Namespace) -> int:
    try:
        opts = options_from(args)
        opts.out.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(opts.out)
    except (ValueError, OSError) as exc:
        print(f"yugami-fleet collect: {exc}", file=sys.stderr)
        return 2
    try:
        client = fm.connect(args, "collect")
    except fm.BrokerError as exc:
        print(f"yugami-fleet collect: {exc}", file=sys.stderr)
        return 1
    tallies = []
    try:
        devices = list(dict.fromkeys(args.device))
        requests = Requests(client, args.prefix, ("collect_list", "fetch"), devices)
        try:
            for device in devices:
                tallies.append(BoxCollector(requests, device, opts, manifest).run())
        finally:
            requests.close()
    except fm.BrokerError as exc:
        print(f"yugami-fleet collect: {exc}", file=sys.stderr)
        return 1
    finally:
        fm.close(client)
    missing = eval_readiness(opts.out)
    if args.json:
        print(json.dumps({"out": str(opts.out), "devices": [t.as_dict() for t in tallies], "missing": missing},
                         indent=1))
    else:
        print(table(tallies))
    for t in tallies:
        for error in t.errors:
            progress(f"error: {error}")
    for line in missing:
        progress(f"note: {line}")
    return 0 if all(t.answered and not t.failed for t in tallies) else 1
