"""Issue 13, item 5: a frame's size is read from the file header before decoding; bombs, tiny frames and
any decoder error are bad frames of that file, never the folder source going down."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.capture import FolderSource, ManagedSource, decode_image_file, frame_size_problem, image_header_size
from agent.config import CaptureConfig
from agent.preprocess import ImageError
from tests.builders import plain_part_images


def png_bomb(width: int, height: int) -> bytes:
    """A 68-byte PNG whose header claims width x height 8-bit RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 3)) + chunk(b"IEND", b"")
    assert len(data) == 68
    return data


def encode(ext: str, width: int, height: int, channels: int = 3) -> bytes:
    img = np.random.default_rng(0).integers(0, 255, (height, width, channels), np.uint8)
    if channels == 1:
        img = img[:, :, 0]
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".tiff", ".ppm"])
def test_header_size_of_every_common_format(ext: str) -> None:
    assert image_header_size(encode(ext, 37, 23)) == (37, 23)


def test_header_size_of_grey_lossless_webp_and_pgm() -> None:
    assert image_header_size(encode(".pgm", 40, 9, channels=1)) == (40, 9)
    img = np.zeros((11, 13, 3), np.uint8)
    ok, buf = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless: VP8L
    assert ok and image_header_size(buf.tobytes()) == (13, 11)


def test_header_size_of_a_bomb_and_of_unknown_or_truncated_data() -> None:
    assert image_header_size(png_bomb(70000, 70000)) == (70000, 70000)
    assert image_header_size(b"GIF89a....") is None
    assert image_header_size(b"\x89PNG\r\n\x1a\n") is None
    assert image_header_size(b"\xff\xd8\xff") is None
    assert image_header_size(b"") is None


def test_frame_size_problem_names_the_key() -> None:
    assert frame_size_problem(640, 480, 40_000_000) is None
    too_big = frame_size_problem(70000, 70000, 40_000_000)
    assert too_big is not None and "capture.max_pixels" in too_big and "4900000000" in too_big
    too_small = frame_size_problem(4, 100, 40_000_000)
    assert too_small is not None and "minimum of 8x8" in too_small


def test_decode_refuses_bombs_tiny_frames_and_decoder_errors(tmp_path: Path) -> None:
    cases = {
        "bomb.png": (png_bomb(70000, 70000), r"over capture\.max_pixels"),
        "big.png": (png_bomb(20000, 20000), r"over capture\.max_pixels"),
        "tiny.png": (encode(".png", 4, 4), "smaller than the minimum"),
        "text.jpg": (b"this is text, not a JPEG", "not a readable image"),
        "empty.png": (b"", "not a readable image"),
        "cut.jpg": (encode(".jpg", 64, 64)[:40], "not a readable image"),
    }
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=why):
            decode_image_file(tmp_path / name, 40_000_000)
    (tmp_path / "ok.png").write_bytes(encode(".png", 64, 48))
    assert decode_image_file(tmp_path / "ok.png", 40_000_000).shape == (48, 64, 3)
    with pytest.raises(ImageError, match=r"over capture\.max_pixels"):
        decode_image_file(tmp_path / "ok.png", 64 * 47)
    (tmp_path / "huge.bmp").write_bytes(b"\0" * 2_000_000)
    with pytest.raises(ImageError, match="larger than any image"):
        decode_image_file(tmp_path / "huge.bmp", 64)


def test_a_bomb_is_a_bad_frame_marked_seen_and_the_next_file_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_bomb.png").write_bytes(png_bomb(70000, 70000))
    assert cv2.imwrite(str(folder / "b_good.png"), plain_part_images(1)[0])
    cfg = CaptureConfig(source=str(folder), settle_s=0.0, poll_interval_s=0.01)
    managed = ManagedSource(FolderSource(folder, tmp_path / "state", cfg), cfg)
    bomb = managed.read()
    assert bomb is not None and bomb.image is None and "capture.max_pixels" in (bomb.error or "")
    managed.done(bomb)
    good = managed.read()
    assert good is not None and good.image is not None and good.source.endswith("b_good.png")
    managed.done(good)
    assert managed.status.state == "up" and managed.status.failures == 0
    # A restart does not read the bomb again.
    managed.close()
    again = FolderSource(folder, tmp_path / "state", cfg)
    again.open()
    assert again.read() is None
