"""Issue 14, item 1: signed bundles. A box with ``bundle_trust`` keys refuses a tampered file, a bad signature,
an unknown key, an unsigned bundle and (without force) a downgrade, each with a reason that says what to do;
several keys are trusted at once for rotation; ``yugami-keys`` makes keys, signs and shows."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bundle import BundleError
from agent.config import ConfigError, parse_config
from agent.service import check_config, load_agent_bundle, model_info
from agent.trust import (
    SIGNATURE_FILE,
    is_downgrade,
    key_id,
    load_public_key,
    load_public_keys,
    load_trusted_keys,
    signature_document,
    verify_signature,
    version_key,
)
from fleet.keys import generate_keypair, load_private_key, main, sign_bundle

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo"


# --- helpers (the integration test uses them too) ------------------------------------------------------


def keypair(folder: Path, name: str) -> tuple[Path, Path]:
    return generate_keypair(folder, name)


def bundle_copy(out: Path, version: str | None = None, key: Path | None = None, src: Path = DEMO) -> Path:
    """The demo bundle copied to ``out``, with ``model.version`` set, signed with ``key`` if given."""
    shutil.copytree(src, out)
    (out / SIGNATURE_FILE).unlink(missing_ok=True)
    if version is not None:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["model"]["version"] = version
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if key is not None:
        sign_bundle(out, key)
    return out


def corrupt_signature(bundle: Path) -> None:
    doc = json.loads((bundle / SIGNATURE_FILE).read_text())
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[5] ^= 0x40
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    (bundle / SIGNATURE_FILE).write_text(json.dumps(doc))


def tamper_file(bundle: Path) -> None:
    with open(bundle / "localization.png", "ab") as f:  # listed in the manifest's files, not needed to score
        f.write(b"\0")


def config(tmp_path: Path, bundle: Path, keys: list[Path], require: bool | None = None) -> Any:
    (tmp_path / "in").mkdir(exist_ok=True)
    return parse_config({"device_id": "cam1", "bundle": str(bundle), "capture": {"source": str(tmp_path / "in")},
                         "storage": {"dir": str(tmp_path / "state")}, "mqtt": {"host": "127.0.0.1"},
                         "bundle_trust": {"public_keys": [str(k) for k in keys], "require_signature": require}},
                        check_files=False)


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path / "keys"
    return {name: keypair(folder, name) for name in ("old", "new", "rogue")}


# --- agent.trust on its own ------------------------------------------------------------------------------


def test_versions_compare_as_dotted_numbers() -> None:
    assert version_key("1.10") > version_key("1.9") and version_key("10") > version_key("9")
    assert version_key("1") == version_key("1.0") == version_key("1.0.0")
    assert is_downgrade("1", "2") and is_downgrade("1.9", "1.10") and not is_downgrade("2", "2")
    assert not is_downgrade("2.0", "2") and not is_downgrade("3", "2.5")
    assert is_downgrade("2024.1-rc", "2024.1-rd") and not is_downgrade("v3", "v2")


def test_key_ids_and_key_files(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    private, public = keys["old"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    kid = key_id(load_public_key(public))
    assert len(kid) == 16 and int(kid, 16) >= 0
    assert set(load_public_keys([public, keys["new"][1], public])) == {kid, key_id(load_public_key(keys["new"][1]))}
    with pytest.raises(ValueError, match=r"old\.key is a private key; give the box the \.pub"):
        load_public_key(private)
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ValueError, match=r"junk\.pub is not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")
    with pytest.raises(ValueError, match=r"cannot read .*absent\.pub"):
        load_public_key(tmp_path / "absent.pub")


def test_every_refusal_says_why(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    trusted = load_public_keys([keys["old"][1], keys["new"][1]])
    unsigned = bundle_copy(tmp_path / "unsigned")
    raw = (unsigned / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match=r"unsigned \(no signature\.json\).*yugami-keys sign"):
        verify_signature(unsigned, raw, trusted, require=True)
    assert verify_signature(unsigned, raw, trusted, require=False) is None

    rogue = bundle_copy(tmp_path / "rogue", key=keys["rogue"][0])
    with pytest.raises(BundleError, match=r"unknown key id [0-9a-f]{16} \(trusted: .*\).*public_keys"):
        verify_signature(rogue, raw, trusted, require=False)  # a signature that is there is always checked

    bad = bundle_copy(tmp_path / "bad", key=keys["old"][0])
    corrupt_signature(bad)
    with pytest.raises(BundleError, match="bad signature"):
        verify_signature(bad, raw, trusted, require=True)

    # the manifest edited after signing (the threshold lowered): caught by the sha256 in the signature ...
    edited = bundle_copy(tmp_path / "edited", key=keys["old"][0])
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["threshold"]["value"] *= 0.5
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="changed after signing"):
        verify_signature(edited, (edited / "manifest.json").read_bytes(), trusted, require=True)
    # ... and by the signature itself when that sha256 is edited to match
    doc = json.loads((edited / SIGNATURE_FILE).read_text())
    doc["manifest_sha256"] = hashlib.sha256((edited / "manifest.json").read_bytes()).hexdigest()
    (edited / SIGNATURE_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="bad signature"):
        verify_signature(edited, (edited / "manifest.json").read_bytes(), trusted, require=True)

    (bad / SIGNATURE_FILE).write_text("{not json")
    with pytest.raises(BundleError, match=r"signature\.json: is not valid JSON"):
        verify_signature(bad, raw, trusted, require=True)


# --- the agent's loader ----------------------------------------------------------------------------------


def test_rotation_two_trusted_keys_and_the_signer_reported(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    bundle = bundle_copy(tmp_path / "b", version="2", key=keys["new"][0])
    cfg = config(tmp_path, bundle, [keys["old"][1], keys["new"][1]])
    assert cfg.bundle_trust.required
    loaded = load_agent_bundle(cfg)
    kid = key_id(load_public_key(keys["new"][1]))
    assert loaded.signer is not None and loaded.signer["key_id"] == kid and loaded.signer["name"] == "new"
    assert model_info(loaded) == {"name": "yugami-demo-parts", "version": "2", "sha256": loaded.manifest_sha256,
                                  "signer": {"key_id": kid, "name": "new"}}
    # the label in signature.json is not what the box reports: it names its own trusted key file
    doc = json.loads((bundle / SIGNATURE_FILE).read_text())
    doc["signer"] = "someone-else"
    (bundle / SIGNATURE_FILE).write_text(json.dumps(doc))
    assert load_agent_bundle(cfg).signer["name"] == "new"  # type: ignore[index]


@pytest.mark.parametrize(("case", "reason"), [
    ("tampered", r"localization\.png: sha256 mismatch .* changed or damaged after export \(or after signing\)"),
    ("bad", "bad signature"),
    ("unknown", "unknown key id"),
    ("unsigned", r"unsigned .*requires a signature"),
])
def test_the_loader_refuses(tmp_path: Path, keys: dict[str, tuple[Path, Path]], case: str, reason: str) -> None:
    key = {"tampered": keys["old"][0], "bad": keys["old"][0], "unknown": keys["rogue"][0], "unsigned": None}[case]
    bundle = bundle_copy(tmp_path / "b", key=key)
    if case == "tampered":
        tamper_file(bundle)
    if case == "bad":
        corrupt_signature(bundle)
    with pytest.raises(BundleError, match=reason):
        load_agent_bundle(config(tmp_path, bundle, [keys["old"][1], keys["new"][1]]))


def test_a_downgrade_needs_force(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    current = load_agent_bundle(config(tmp_path, bundle_copy(tmp_path / "v10", "1.10", keys["old"][0]),
                                       [keys["old"][1]]))
    older = config(tmp_path, bundle_copy(tmp_path / "v9", "1.9", keys["old"][0]), [keys["old"][1]])
    with pytest.raises(BundleError, match=r"downgrade from version 1\.10 to 1\.9 refused; send force: true"):
        load_agent_bundle(older, current=current)
    assert load_agent_bundle(older, current=current, force=True).version == "1.9"
    same = load_agent_bundle(config(tmp_path, current.path, [keys["old"][1]]), current=current)
    assert same.manifest_sha256 == current.manifest_sha256  # reloading the same version is no downgrade
    # path= loads another folder than the configured one (an installed bundle)
    assert load_agent_bundle(older, path=current.path).version == "1.10"


def test_without_keys_nothing_is_required_and_signatures_are_not_checked(tmp_path: Path,
                                                                         keys: dict[str, tuple[Path, Path]]) -> None:
    cfg = config(tmp_path, bundle_copy(tmp_path / "b", key=keys["rogue"][0]), [])
    assert not cfg.bundle_trust.required
    assert load_agent_bundle(cfg).signer is None
    unsigned = config(tmp_path, bundle_copy(tmp_path / "u"), [keys["old"][1]], require=False)
    assert load_agent_bundle(unsigned).signer is None  # keys given, signature not required: accepted


# --- config --------------------------------------------------------------------------------------------


def test_config_checks_the_trust_section(tmp_path: Path, keys: dict[str, tuple[Path, Path]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "in").mkdir()
    base = {"device_id": "cam1", "bundle": str(tmp_path / "b"), "capture": {"source": str(tmp_path / "in")},
            "storage": {"dir": str(tmp_path / "state")}, "mqtt": {"host": "127.0.0.1"}}
    with pytest.raises(ConfigError, match=r"bundle_trust\.require_signature: true needs .*public_keys"):
        parse_config({**base, "bundle_trust": {"require_signature": True}}, check_files=False)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "bundle_trust": {"public_keys": [str(keys["old"][0]), str(tmp_path / "junk.pub"),
                                                               str(tmp_path / "none.pub")]}})
    text = "\n".join(info.value.problems)
    assert r"bundle_trust.public_keys[0]:" in text and "is a private key" in text
    assert r"bundle_trust.public_keys[1]:" in text and "not a PEM public key" in text
    assert r"bundle_trust.public_keys[2]:" in text and "cannot read" in text
    monkeypatch.setenv("YG_KEYS", str(keys["old"][1].parent))
    cfg = parse_config({**base, "bundle_trust": {"public_keys": ["${YG_KEYS}/old.pub"]}})
    assert cfg.bundle_trust.public_keys == [str(keys["old"][1])] and cfg.bundle_trust.required
    monkeypatch.delenv("YG_KEYS")
    with pytest.raises(ConfigError, match=r"bundle_trust\.public_keys\[0\]: .* unset environment variable"):
        parse_config({**base, "bundle_trust": {"public_keys": ["${YG_KEYS}/old.pub"]}})


def test_check_config_shows_the_signer_or_the_refusal(tmp_path: Path, keys: dict[str, tuple[Path, Path]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path, bundle_copy(tmp_path / "b", version="4", key=keys["old"][0]), [keys["old"][1]])
    assert check_config(cfg) == 0
    summary = json.loads(capsys.readouterr().out.split("config OK: ", 1)[1])
    assert summary["model"]["version"] == "4" and summary["model"]["signer"]["name"] == "old"
    cfg = config(tmp_path, bundle_copy(tmp_path / "u"), [keys["old"][1]])
    assert check_config(cfg) == 78
    assert "unsigned" in capsys.readouterr().err


# --- yugami-keys -----------------------------------------------------------------------------------------


def test_yugami_keys_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--out", str(tmp_path / "k"), "--name", "rel"]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "k" / "rel.key", tmp_path / "k" / "rel.pub"
    kid = key_id(load_public_key(public))
    assert kid in out and stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes()
    assert main(["generate", "--out", str(tmp_path / "k"), "--name", "rel"]) == 2
    assert "already exist" in capsys.readouterr().err and private.read_bytes() == before
    assert main(["generate", "--out", str(tmp_path / "k"), "--name", "other"]) == 0
    capsys.readouterr()

    bundle = bundle_copy(tmp_path / "b", version="7")
    assert main(["sign", str(bundle), "--key", str(private), "--signer", "ci"]) == 0
    assert kid in capsys.readouterr().out
    assert main(["show", str(bundle), "--trust", str(public), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["key_id"] == kid and shown["signer"] == "ci" and shown["verified"] is True
    assert shown["model"]["version"] == "7"
    assert main(["show", str(bundle), "--trust", str(tmp_path / "k" / "other.pub"), "--json"]) == 1
    assert "unknown key id" in json.loads(capsys.readouterr().out)["reason"]
    assert main(["show", str(public)]) == 0 and kid in capsys.readouterr().out
    assert main(["show", str(private), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": str(private), "kind": "private", "key_id": kid,
                                                   "name": "rel"}

    tamper_file(bundle)
    assert main(["show", str(bundle), "--trust", str(public), "--json"]) == 1
    assert "files changed after signing" in json.loads(capsys.readouterr().out)["reason"]
    assert main(["sign", str(bundle), "--key", str(private)]) == 2  # a damaged bundle is not signed
    assert "not whole" in capsys.readouterr().err
    assert main(["sign", str(bundle), "--key", str(public)]) == 2
    assert "not a private key" in capsys.readouterr().err


def test_yugami_keys_says_which_folder_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that cannot be made or written: exit 2 naming it, not a traceback."""
    (tmp_path / "file").write_text("x")
    assert main(["generate", "--out", str(tmp_path / "file" / "keys")]) == 2
    assert f"cannot make the folder {tmp_path / 'file' / 'keys'}" in capsys.readouterr().err
    private, _ = keypair(tmp_path / "k", "rel")
    bundle = bundle_copy(tmp_path / "b")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("fleet.keys.tempfile.mkstemp", refuse)
    assert main(["sign", str(bundle), "--key", str(private)]) == 2
    assert f"cannot write {SIGNATURE_FILE} into {bundle}" in capsys.readouterr().err
    monkeypatch.setattr("fleet.keys.os.open", refuse)
    assert main(["generate", "--out", str(tmp_path / "k"), "--name", "new"]) == 2
    assert "cannot write the key pair" in capsys.readouterr().err


def test_yugami_keys_help_has_examples() -> None:
    from fleet.keys import build_parser

    text = build_parser().format_help()
    for words in ("generate", "sign", "show", "--sign-key", "bundle_trust.public_keys", "Rotation"):
        assert words in text


# --- a signature.json nobody wrote: only BundleError, never a crash or an acceptance --------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = ("format", "algorithm", "key_id", "signer", "signed_at", "manifest_sha256", "signature")


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _json_values, min_size=1, max_size=4),
       drop=st.sets(st.sampled_from(_FIELDS), max_size=2))
def test_a_damaged_signature_is_refused_with_a_bundle_error(tmp_path_factory: pytest.TempPathFactory,
                                                            changes: dict[str, Any], drop: set[str]) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    private, public = keypair(folder / "keys", "k")
    bundle = folder / "b"
    bundle.mkdir()
    raw = b'{"files": {}}'
    (bundle / "manifest.json").write_bytes(raw)
    doc = signature_document(load_private_key(private), raw, "k")
    real = dict(doc)
    doc.update(changes)
    for name in drop:
        doc.pop(name, None)
    (bundle / SIGNATURE_FILE).write_text(json.dumps(doc))
    keys = load_trusted_keys([public])
    proof = ("format", "algorithm", "key_id", "manifest_sha256", "signature")
    try:
        signer = verify_signature(bundle, raw, keys, require=True)
    except BundleError:
        return
    assert all(doc.get(k) == real[k] for k in proof), "a changed signature was accepted"
    assert signer is not None and signer.signer == "k"
