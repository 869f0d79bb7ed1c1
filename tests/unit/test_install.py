"""agent.install without a broker: chunks reassembled (out of order, repeated, oversize, stalled, replaced), the
tar checked and extracted safely (links, paths, devices refused), installed.json, pruning, the gate and watch."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.commands import INSTALL_MAX_BYTES, CommandError, parse_command_body
from agent.install import (
    MAX_INSTALL_COMMAND_BYTES,
    Installed,
    InstallError,
    Reassembler,
    Shadow,
    Watch,
    bundle_tar,
    check_install_body,
    extract_bundle,
    gate_problem,
    install_chunks,
    prune,
    read_installed,
    shadow_score,
    stage,
    write_installed,
)


def make_bundle(folder: Path, name: str = "parts", version: str = "2") -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model": {"name": name, "version": version}}))
    (folder / "bank.npz").write_bytes(os.urandom(5000))
    return folder


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def reassembler(tmp_path: Path, max_bytes: int = 1 << 20) -> tuple[Reassembler, Clock]:
    clock = Clock()
    return Reassembler(tmp_path / "bundles" / ".incoming", max_bytes, stall_s=60, clock=clock), clock


def test_chunks_out_of_order_and_repeated_give_the_bundle_back(tmp_path: Path) -> None:
    tar = bundle_tar(make_bundle(tmp_path / "src"))
    chunks = install_chunks(tar, "t1", chunk_bytes=1024)
    assert len(chunks) > 3 and all(check_install_body(c) is None for c in chunks)
    r, _ = reassembler(tmp_path)
    order = [2, 0, 0, *range(3, len(chunks)), 2]  # chunk 1 last; 0 and 2 twice
    for seq in order:
        assert r.add(chunks[seq]).status == "partial"
    done = r.add(chunks[1])
    assert done.status == "complete" and done.transfer is not None
    assert r.add(chunks[1]).status == "ignored"  # a late repeat of a finished transfer
    staged = stage(done.transfer, tmp_path / "bundles", 1 << 20)
    assert staged.name == f"parts-2-{hashlib.sha256(tar).hexdigest()[:12]}"
    assert sorted(p.name for p in staged.iterdir()) == ["bank.npz", "manifest.json"]
    assert (staged / "bank.npz").read_bytes() == (tmp_path / "src" / "bank.npz").read_bytes()
    assert not done.transfer.folder.exists()


def test_a_damaged_transfer_fails_its_sha256(tmp_path: Path) -> None:
    tar = bundle_tar(make_bundle(tmp_path / "src"))
    chunks = install_chunks(tar, "t1", chunk_bytes=4096)
    raw = bytearray(base64.b64decode(chunks[0]["data"]))
    raw[600] ^= 0xFF
    chunks[0]["data"] = base64.b64encode(bytes(raw)).decode()
    r, _ = reassembler(tmp_path)
    for c in chunks:
        res = r.add(c)
    assert res.status == "complete"
    with pytest.raises(InstallError, match="arrived damaged"):
        stage(res.transfer, tmp_path / "bundles", 1 << 20)
    assert not res.transfer.folder.exists()


def test_oversize_transfers_and_chunks_are_refused(tmp_path: Path) -> None:
    tar = bundle_tar(make_bundle(tmp_path / "src"))
    r, _ = reassembler(tmp_path, max_bytes=len(tar) - 1)
    first = install_chunks(tar, "big", chunk_bytes=1024)[0]
    with pytest.raises(InstallError, match=r"fleet\.max_bundle_bytes"):
        r.add(first)
    assert r.add(first).status == "ignored"  # refused once; its later chunks are not answered again
    r, _ = reassembler(tmp_path)
    liar = {**install_chunks(tar, "liar", chunk_bytes=1024)[0], "bytes": 100, "chunks": 2}
    with pytest.raises(InstallError, match="more than the 100 bytes"):
        r.add(liar)
    assert r.current is None and not (tmp_path / "bundles" / ".incoming" / "liar").exists()


def test_a_stalled_transfer_expires_and_a_new_one_replaces_an_unfinished_one(tmp_path: Path) -> None:
    tar = bundle_tar(make_bundle(tmp_path / "src"))
    r, clock = reassembler(tmp_path)
    a = install_chunks(tar, "a", chunk_bytes=1024)
    b = install_chunks(tar, "b", chunk_bytes=1024)
    r.add(a[0])
    clock.t = 59
    assert r.expire() is None
    res = r.add(b[0])
    assert res.replaced is not None and res.replaced.transfer == "a" and res.status == "partial"
    assert r.add(a[1]).status == "ignored"  # the replaced transfer does not come back
    clock.t = 200
    gone = r.expire()
    assert gone is not None and gone.transfer == "b" and r.current is None


def test_chunk_bodies_are_checked_before_they_are_queued() -> None:
    good = install_chunks(b"x" * 10, "t", chunk_bytes=4)[0]
    assert check_install_body(good) is None
    for change, word in (({"transfer": "../x"}, "transfer"), ({"seq": 5}, "seq"), ({"sha256": "ABC"}, "sha256"),
                         ({"data": 3}, "data"), ({"force": "yes"}, "force"), ({"chunks": 0}, "chunks")):
        assert word in (check_install_body({**good, **change}) or ""), change


def test_install_commands_may_carry_a_chunk_other_commands_keep_their_limit() -> None:
    assert INSTALL_MAX_BYTES == MAX_INSTALL_COMMAND_BYTES
    body = {"id": "r", **install_chunks(os.urandom(256 * 1024), "t")[0]}
    payload = json.dumps(body).encode()
    assert 4096 < len(payload) <= INSTALL_MAX_BYTES
    assert parse_command_body("install", payload, 4096).name == "install"
    with pytest.raises(CommandError, match=r"mqtt\.max_command_bytes"):
        parse_command_body("reload", b'{"id": "' + b"x" * 5000 + b'"}', 4096)
    with pytest.raises(CommandError, match="over the limit"):
        parse_command_body("install", b" " * (INSTALL_MAX_BYTES + 1), 4096)


def tar_with(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        manifest = b"{}"
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"abc", link: str = "") -> tuple[Any, Any]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


@pytest.mark.parametrize("bad, word", [
    (member("../evil.txt"), "not a plain file name"),
    (member("sub/file.txt"), "not a plain file name"),
    (member("/etc/passwd"), "not a plain file name"),
    (member(".hidden"), "not a plain file name"),
    (member("link", tarfile.SYMTYPE, link="/etc/passwd"), "a link"),
    (member("hard", tarfile.LNKTYPE, link="manifest.json"), "a link"),
    (member("dev", tarfile.CHRTYPE), "a device"),
    (member("fifo", tarfile.FIFOTYPE), "a device or fifo"),
    (member("sub", tarfile.DIRTYPE), "a folder"),
    (member("manifest.json"), "twice"),
])
def test_extraction_refuses_anything_but_plain_top_level_files(tmp_path: Path, bad: Any, word: str) -> None:
    tar = tmp_path / "b.tar"
    tar.write_bytes(tar_with([bad]))
    with pytest.raises(InstallError, match=word):
        extract_bundle(tar, tmp_path / "out", 1 << 20)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_extraction_bounds_the_size_and_needs_a_manifest(tmp_path: Path) -> None:
    tar = tmp_path / "b.tar"
    tar.write_bytes(tar_with([member("bank.npz", data=b"x" * 5000)]))
    with pytest.raises(InstallError, match="max_bundle_bytes"):
        extract_bundle(tar, tmp_path / "out", 1000)
    assert extract_bundle(tar, tmp_path / "ok", 10000) == ["bank.npz", "manifest.json"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info, data = member("bank.npz")
        t.addfile(info, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())
    with pytest.raises(InstallError, match=r"no manifest\.json"):
        extract_bundle(tar, tmp_path / "none", 10000)
    tar.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InstallError, match="not a readable tar"):
        extract_bundle(tar, tmp_path / "junk", 10000)


def test_bundle_tar_refuses_links_and_folders_in_the_bundle(tmp_path: Path) -> None:
    src = make_bundle(tmp_path / "src")
    assert bundle_tar(src) == bundle_tar(src)  # the same folder gives the same bytes
    (src / "sub").mkdir()
    with pytest.raises(InstallError, match="plain files only"):
        bundle_tar(src)


def test_installed_json_round_trip_and_pruning(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    assert read_installed(bundles) == (None, None)
    folders = []
    for i in range(5):
        f = make_bundle(bundles / f"b{i}")
        os.utime(f, (1000 + i, 1000 + i))
        folders.append(f)
    outside = tmp_path / "config-bundle"
    write_installed(bundles, Installed(folders[0], outside, str(outside)))
    state, problem = read_installed(bundles)
    assert problem is None and state == Installed(folders[0], outside.resolve(), str(outside))
    assert json.loads((bundles / "installed.json").read_text())["current"] == "b0"  # by name: the dir may move
    removed = prune(bundles, 3, [folders[0], outside])
    assert sorted(p.name for p in removed) == ["b1", "b2"]  # b0 protected; b4, b3 the newest others
    assert sorted(p.name for p in bundles.iterdir() if p.is_dir()) == ["b0", "b3", "b4"]
    (bundles / "installed.json").write_text("{broken")
    state, problem = read_installed(bundles)
    assert state is None and "cannot be read" in (problem or "")


class Kept:
    def __init__(self, i: int, verdict: str) -> None:
        self.frame_id, self.image, self.payload = f"f{i}", np.zeros((4, 4, 3), np.uint8), {"verdict": verdict}


def test_shadow_gate_and_watch() -> None:
    frames = [Kept(i, "ok" if i % 4 else "anomaly") for i in range(8)]
    all_bad = shadow_score(lambda image: "anomaly", frames)
    assert all_bad.as_dict() == {"frames": 8, "anomalies": 8, "anomaly_share": 1.0, "old_anomaly_share": 0.25,
                                 "errors": 0}
    problem = gate_problem(all_bad, 0.5)
    assert problem and "8 of the last 8" in problem and "bundle in use: 2 of 8" in problem

    def broken(image: Any) -> str:
        raise ValueError("no")

    assert shadow_score(broken, frames[:2]).errors == 2
    assert gate_problem(shadow_score(lambda image: "ok", frames), 0.5) is None
    assert gate_problem(Shadow(0, 0, 0), 0.0) is None  # nothing to judge: the watch after the switch still is

    w = Watch(10, 0.5)
    assert [w.add(True) for _ in range(5)] == [None] * 5
    assert w.add(True) == "failed" and "6 of the first 6" in w.reason()
    w = Watch(4, 0.5)
    assert [w.add(a) for a in (True, False, True, False)] == [None, None, None, "passed"]


def test_the_fleet_section_is_validated() -> None:
    from agent.config import ConfigError, parse_config

    base = {"device_id": "cam1", "bundle": "/b", "capture": {"source": "/in"}, "mqtt": {"host": "h"}}
    cfg = parse_config({**base, "fleet": {"groups": ["line-2"], "install": "any"}}, check_files=False)
    assert cfg.fleet.groups == ["line-2"] and cfg.fleet.shadow_frames == 16 and cfg.fleet.keep_bundles == 3
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "service": {"recent_frames": 8},
                      "fleet": {"shadow_frames": 9, "groups": ["a/b", "x", "x"], "install": "maybe",
                                "max_anomaly_share": 1.5, "keep_bundles": 1, "max_bundle_bytes": 0}},
                     check_files=False)
    text = str(err.value)
    assert "fleet.install" in text  # a wrong literal is reported before the cross-field rules
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "service": {"recent_frames": 8},
                      "fleet": {"shadow_frames": 9, "groups": ["a/b", "x", "x"], "max_anomaly_share": 1.5,
                                "keep_bundles": 1, "max_bundle_bytes": 0}}, check_files=False)
    text = str(err.value)
    assert "fleet.shadow_frames: 9 is more than service.recent_frames (8)" in text
    for key in ("fleet.groups[0]", "listed twice", "fleet.max_anomaly_share", "fleet.keep_bundles",
                "fleet.max_bundle_bytes"):
        assert key in text, key
