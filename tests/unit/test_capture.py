"""Frame sources through OpenCV: folder (once each, name order, across restarts), video file, failures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.capture import (
    FolderSource,
    ManagedSource,
    SourceError,
    SourceStatus,
    VideoCaptureSource,
    make_source,
    redact_url,
)
from agent.config import CaptureConfig, parse_config
from tests.builders import plain_part_images


def capture_cfg(**kw: object) -> CaptureConfig:
    base = {"source": "x", "settle_s": 0.0, "poll_interval_s": 0.01, "reopen_backoff_s": 1.0,
            "reopen_backoff_max_s": 4.0}
    base.update(kw)
    return CaptureConfig(**base)  # type: ignore[arg-type]


def write_png(folder: Path, name: str, img: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(folder / name), img)


def drain(src: FolderSource, mark: bool = True) -> list[str]:
    names = []
    while (frame := src.read()) is not None:
        names.append(Path(frame.source).name)
        if mark:
            src.done(frame)
    return names


def test_folder_inspects_each_file_once_in_name_order_also_across_restarts(tmp_path: Path) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    imgs = plain_part_images(5, seed=1)
    for name, img in zip(["b.png", "a.png", "c.jpg"], imgs, strict=False):
        write_png(folder, name, img)
    (folder / ".d.png.tmp").write_bytes(b"half written")  # hidden: ignored
    (folder / "notes.txt").write_text("not an image")
    src = FolderSource(folder, state, capture_cfg())
    src.open()
    assert drain(src) == ["a.png", "b.png", "c.jpg"]
    time.sleep(0.02)
    write_png(folder, "d.png", imgs[3])
    assert drain(src) == ["d.png"]
    src.close()
    # A restart: nothing is inspected twice; a file added meanwhile is.
    write_png(folder, "0.png", imgs[4])
    again = FolderSource(folder, state, capture_cfg())
    again.open()
    assert drain(again) == ["0.png"]
    again.close()


def test_a_file_not_marked_done_comes_again_with_the_same_id(tmp_path: Path) -> None:
    folder, state = tmp_path / "in", tmp_path / "state"
    write_png(folder, "part.v2.png", plain_part_images(1)[0])
    src = FolderSource(folder, state, capture_cfg())
    src.open()
    first = src.read()
    assert first is not None and first.frame_id.startswith("part.v2-")
    src.close()  # killed before done(): the verdict may have been sent, the mark was not written
    again = FolderSource(folder, state, capture_cfg())
    again.open()
    second = again.read()
    assert second is not None and second.frame_id == first.frame_id
    again.close()


def test_unreadable_file_is_a_bad_frame_not_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    src = FolderSource(folder, tmp_path / "state", capture_cfg())
    src.open()
    frame = src.read()
    assert frame is not None and frame.image is None and "not a readable image" in (frame.error or "")
    src.done(frame)
    assert src.read() is None


def test_folder_waits_for_a_file_still_being_written(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_png(folder, "a.png", plain_part_images(1)[0])
    write_png(folder, "b.png", plain_part_images(1)[0])
    past = time.time() - 100
    os.utime(folder / "a.png", (past, past))
    src = FolderSource(folder, tmp_path / "state", capture_cfg(settle_s=50.0))
    src.open()
    assert drain(src) == ["a.png"]  # b.png was written "just now"
    os.utime(folder / "b.png", (past, past))
    time.sleep(0.02)
    assert drain(src) == ["b.png"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_vanished_folder_is_reported_and_reopened_with_backoff(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_png(folder, "a.png", plain_part_images(1)[0])
    changes: list[tuple[str, str | None]] = []

    def on_change(s: SourceStatus) -> None:
        changes.append((s.state, s.error))

    clock = FakeClock()
    src = ManagedSource(FolderSource(folder, tmp_path / "state", capture_cfg()), capture_cfg(), on_change, clock)
    frame = src.read()
    assert frame is not None
    src.done(frame)
    (folder / "a.png").unlink()
    folder.rmdir()
    time.sleep(0.02)
    assert src.read() is None and src.status.state == "down" and "cannot list" in (src.status.error or "")
    assert src.read() is None and src.status.failures == 1  # inside the 1 s wait: no new attempt
    clock.now += 1.0
    assert src.read() is None and src.status.failures == 2 and "does not exist" in (src.status.error or "")
    assert src.backoff() == 2.0
    clock.now += 1.0
    assert src.read() is None and src.status.failures == 2  # inside the 2 s wait
    write_png(folder, "b.png", plain_part_images(1)[0])
    clock.now += 1.5
    frame = src.read()
    assert frame is not None and Path(frame.source).name == "b.png"
    assert src.status.state == "up" and src.status.reopens == 1 and src.status.failures == 0
    assert [c[0] for c in changes] == ["up", "down", "down", "up"]  # each new error is reported once


def test_backoff_doubles_up_to_the_limit(tmp_path: Path) -> None:
    clock = FakeClock()
    src = ManagedSource(FolderSource(tmp_path / "never", tmp_path, capture_cfg()), capture_cfg(), clock=clock)
    waits = []
    for _ in range(5):
        src.read()
        waits.append(src.backoff())
        clock.now += 100
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]


def write_video(path: Path, n: int) -> list[np.ndarray]:
    frames = plain_part_images(n, seed=2)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 96))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return frames


def test_video_file_reads_every_frame_then_ends(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 6)
    src = ManagedSource(VideoCaptureSource("video", str(video), capture_cfg(), "run1"), capture_cfg())
    frames = [src.read() for _ in range(6)]
    assert [f.source for f in frames if f] == [f"{video}#{i}" for i in range(6)]
    assert frames[0] is not None and frames[0].image is not None and frames[0].image.shape == (96, 96, 3)
    assert len({f.frame_id for f in frames if f}) == 6
    assert src.read() is None and src.ended


def test_looped_video_starts_again(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 3)
    src = ManagedSource(VideoCaptureSource("video", str(video), capture_cfg(loop=True), "r"),
                        capture_cfg(loop=True))
    sources = []
    for _ in range(10):
        frame = src.read()
        if frame is not None:
            sources.append(frame.source.rsplit("#", 1)[1])
    assert sources[:7] == ["0", "1", "2", "0", "1", "2", "0"] and not src.ended


def test_missing_or_corrupt_video_and_missing_camera_fail_cleanly(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        VideoCaptureSource("video", str(tmp_path / "none.mp4"), capture_cfg(), "r").open()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    src = VideoCaptureSource("video", str(junk), capture_cfg(), "r")
    with pytest.raises(SourceError):
        src.open()
        src.read()
    with pytest.raises(SourceError, match="cannot open"):
        VideoCaptureSource("device", "/dev/video99", capture_cfg(), "r").open()


def test_make_source_and_url_redaction(tmp_path: Path) -> None:
    cfg = parse_config({"device_id": "c", "bundle": str(tmp_path), "capture": {"source": "rtsp://u:pw@cam:554/s"},
                        "mqtt": {"host": "h"}, "storage": {"dir": str(tmp_path)}}, check_files=False)
    src = make_source(cfg, "r")
    assert src.kind == "stream" and src.name == "rtsp://u:***@cam:554/s" and "pw" not in src.name
    assert redact_url("http://cam/mjpeg") == "http://cam/mjpeg"


class MjpegServer:
    """A local HTTP MJPEG camera (multipart/x-mixed-replace) that sends ``count`` frames, then hangs up."""

    def __init__(self, count: int) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in plain_part_images(3, seed=9)]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for i in range(count):
                    j = jpegs[i % len(jpegs)]
                    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(j)}\r\n\r\n".encode()
                    try:
                        self.wfile.write(head + j + b"\r\n")
                    except OSError:
                        return

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/video.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_mjpeg_stream_reads_frames_and_a_hang_up_is_a_failure() -> None:
    server = MjpegServer(count=4)
    try:
        cfg = capture_cfg(source=server.url, open_timeout_s=5.0, read_timeout_s=5.0)
        src = ManagedSource(VideoCaptureSource("stream", server.url, cfg, "r"), cfg)
        assert src.live
        frames = [src.read(), src.read()]
        src.skip()  # between inspections under max_fps: drop a frame, stay up
        frames.append(src.read())
        assert src.status.state == "up"
        assert all(f is not None and f.image is not None and f.image.shape == (96, 96, 3) for f in frames)
        assert frames[0] is not None and frames[0].source == server.url
        # the server hangs up after 4 frames (3 read, 1 skipped): the source goes down, to be reopened
        for _ in range(5):
            if src.read() is None:
                break
        assert src.status.state == "down" and "stopped giving frames" in (src.status.error or "")
    finally:
        server.close()
