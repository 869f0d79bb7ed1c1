"""The camera box has no TensorFlow: every agent module must import without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK_AND_IMPORT = r"""
import importlib, importlib.abc, pkgutil, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "keras", "tf_keras"}:
            raise ImportError(f"{name} is blocked: the agent must not import it")
        return None

sys.meta_path.insert(0, Block())
import agent
names = [m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"tensorflow", "keras", "tf_keras"})
assert not leaked, leaked
print("imported", len(names), "modules:", " ".join(names))
"""


def test_every_agent_module_imports_without_tensorflow() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_AND_IMPORT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "agent.bundle" in proc.stdout and "agent.runtime" in proc.stdout


def test_the_block_really_blocks() -> None:
    """Guard against a vacuous pass: the same block makes a TensorFlow import fail."""
    code = BLOCK_AND_IMPORT.split("import agent")[0] + "import tensorflow\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "blocked" in proc.stderr
