"""Issue 13, item 7: a failure while the agent sets up (outbox, TLS files) is a clear message naming the
key and the fix, and exit 78 (a config problem: systemd does not restart into it), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import plain_part_images
from tests.integration.conftest import ROOT, base_config, free_port, write_config, write_images

pytestmark = pytest.mark.integration


def start(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.service", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage", ["not a database", "a folder"])
def test_an_outbox_that_cannot_be_opened_exits_78_naming_storage_dir(tmp_path: Path, tiny_bundle: Path,
                                                                     damage: str) -> None:
    folder = tmp_path / "in"
    write_images(folder, plain_part_images(1, seed=51))
    state = tmp_path / "state"
    state.mkdir()
    outbox = state / "outbox.sqlite3"
    if damage == "a folder":
        outbox.mkdir()
    else:
        outbox.write_bytes(b"this is not an SQLite database, just text that happens to be here" * 100)
    config = write_config(tmp_path / "agent.yaml", **base_config(tmp_path, tiny_bundle, free_port(), str(folder)))
    proc = start(config)
    assert proc.returncode == 78, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "storage.dir: the outbox" in proc.stderr and str(outbox) in proc.stderr
    assert "writable folder" in proc.stderr
