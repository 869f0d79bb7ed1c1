"""``yugami-keys``: the Ed25519 keys that sign bundles, on the workstation.

``generate`` writes a key pair (``NAME.key``, PKCS8 PEM, mode 0600, stays on the workstation; ``NAME.pub``,
goes to every box's ``bundle_trust.public_keys``), ``sign`` adds ``signature.json`` to a bundle (the format
is :func:`agent.trust.signature_document`'s), ``show`` prints a key's id or who signed a bundle and whether
the signature verifies against given public keys. See docs/FLEET.md, "Keys and signing".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import MANIFEST, BundleError, sha256_bytes
from agent.trust import (
    SIGNATURE_FILE,
    key_id,
    key_name,
    load_public_key,
    load_trusted_keys,
    read_signature,
    signature_document,
    verify_signature,
)

logger = logging.getLogger(__name__)

DEFAULT_NAME = "yugami-signing"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class KeysError(ValueError):
    """A key or bundle that cannot be used; the message says what and how to fix it."""


# --- keys ---------------------------------------------------------------------------------------------


def generate_keypair(out_dir: str | Path, name: str = DEFAULT_NAME, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, PKCS8 PEM, mode 0600) and ``NAME.pub`` (SubjectPublicKeyInfo PEM).

    Refuses to replace an existing key unless ``force``: a lost private key means re-signing every bundle
    and re-deploying every box's trust list."""
    if not name or Path(name).name != name or name.startswith("."):
        raise KeysError(f"key name {name!r} must be a plain file name (e.g. release-2026)")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeysError(f"cannot make the folder {out} ({exc.strerror or exc}); give an --out you can write") from exc
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise KeysError(f"{', '.join(map(str, existing))} already exist(s); pick another --name, or pass --force to "
                        "replace it (bundles signed with the old key then verify only where the old .pub is trusted)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        _write_new(private_path, private_pem, 0o600)
        _write_new(public_path, public_pem, 0o644)
    except OSError as exc:
        raise KeysError(f"cannot write the key pair into {out} ({exc.strerror or exc}); give an --out you can "
                        "write") from exc
    logger.info("wrote key pair %s / %s (key id %s)", private_path, public_path, key_id(key.public_key()))
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a fresh file created with ``mode`` (a private key is never readable by others,
    not even for a moment), replacing what was there."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # the umask may have taken bits away from the public file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (unencrypted PKCS8, as ``generate`` writes it)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KeysError(f"cannot read the key {p} ({exc.strerror or exc}); fix the path or its permissions") from exc
    if b"PRIVATE KEY" not in data:
        raise KeysError(f"{p} is not a private key; sign with the .key file from `yugami-keys generate`, not the .pub")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeysError(f"{p} is not an unencrypted PEM private key ({exc}); use a .key from "
                        "`yugami-keys generate`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError(f"{p} is not an Ed25519 key; make one with `yugami-keys generate`")
    return key


# --- bundles ------------------------------------------------------------------------------------------


def _manifest(bundle_dir: Path) -> tuple[bytes, dict[str, Any]]:
    mpath = bundle_dir / MANIFEST
    try:
        raw = mpath.read_bytes()
    except OSError as exc:
        raise KeysError(f"{bundle_dir} is not a bundle ({mpath}: {exc.strerror or exc}); give a folder written "
                        "by yugami-train") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise KeysError(f"{mpath} is not valid JSON ({exc}); re-export the bundle") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise KeysError(f"{mpath} lists no 'files'; re-export the bundle with yugami-train")
    return raw, manifest


def file_problems(bundle_dir: str | Path) -> list[str]:
    """Files the manifest pins that are missing or whose sha256 differs (what the box would refuse)."""
    root = Path(bundle_dir)
    _, manifest = _manifest(root)
    problems = []
    for name, digest in manifest["files"].items():
        path = root / str(name)
        if Path(str(name)).name != name or not path.is_file():
            problems.append(f"{name}: missing")
        else:
            try:
                data = path.read_bytes()
            except OSError as exc:
                problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
                continue
            if sha256_bytes(data) != digest:
                problems.append(f"{name}: sha256 differs from the manifest (changed after export)")
    return problems


def sign_bundle(bundle_dir: str | Path, key_path: str | Path, signer_name: str | None = None) -> dict[str, Any]:
    """Write ``signature.json`` into the bundle: the key's signature over the raw manifest bytes.

    Only a whole bundle is signed (every file the manifest pins present with its sha256): a signature
    vouches for what is in the folder. Returns the signature document."""
    root = Path(bundle_dir)
    key = load_private_key(key_path)
    raw, _ = _manifest(root)
    problems = file_problems(root)
    if problems:
        raise KeysError(f"{root} is not whole, so it is not signed: {'; '.join(problems)}. Copy or re-export it")
    doc = signature_document(key, raw, signer_name or key_name(key_path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}.", dir=root)
    except OSError as exc:
        raise KeysError(f"cannot write {SIGNATURE_FILE} into {root} ({exc.strerror or exc}); sign a copy you "
                        "can write, or fix the folder's permissions") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / SIGNATURE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("signed %s with key %s (%s)", root, doc["key_id"], doc["signer"])
    return doc


def describe_bundle(bundle_dir: str | Path, trust: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Who signed a bundle, and with ``trust`` (.pub files) whether the box would accept it."""
    root = Path(bundle_dir)
    raw, manifest = _manifest(root)
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    info: dict[str, Any] = {
        "bundle": str(root),
        "model": {"name": model.get("name"), "version": model.get("version")},
        "manifest_sha256": sha256_bytes(raw),
        "signed": False,
    }
    try:
        doc = read_signature(root)
    except BundleError as exc:
        info.update(signed=True, verified=False, reason=str(exc))
        return info
    if doc is not None:
        info.update(signed=True, key_id=doc["key_id"], signer=doc.get("signer"), signed_at=doc.get("signed_at"))
    if trust:
        info.update(_verdict(root, raw, trust))
    return info


def _verdict(root: Path, raw: bytes, trust: Sequence[str | Path]) -> dict[str, Any]:
    try:
        keys = load_trusted_keys(trust)
    except ValueError as exc:
        raise KeysError(f"--trust: {exc}") from exc
    try:
        signer = verify_signature(root, raw, keys, require=True)
    except BundleError as exc:
        return {"verified": False, "reason": str(exc)}
    problems = file_problems(root)
    if problems:
        return {"verified": False, "reason": "the signature verifies, but files changed after signing: "
                + "; ".join(problems)}
    return {"verified": True, "trusted_key": signer.signer if signer else None}


def describe_key(path: str | Path) -> dict[str, Any]:
    """The id of a public key file, or of a private key file's public half."""
    p = Path(path)
    try:
        return {"file": str(p), "kind": "public", "key_id": key_id(load_public_key(p)), "name": key_name(p)}
    except ValueError as public_problem:
        try:
            key = load_private_key(p)
        except KeysError:
            raise KeysError(str(public_problem)) from None
        return {"file": str(p), "kind": "private", "key_id": key_id(key.public_key()), "name": key_name(p)}


# --- command line -------------------------------------------------------------------------------------

EPILOG = """examples:
  # once, on the workstation: a key pair (keep release-2026.key secret and backed up)
  yugami-keys generate --out ~/yugami-keys --name release-2026
  # every box trusts the public half (agent config: bundle_trust.public_keys)
  sudo install -m 644 ~/yugami-keys/release-2026.pub /etc/yugami-agent/keys/
  # sign while training, or sign a bundle you already have
  yugami-train DATA --out runs/screw --sign-key ~/yugami-keys/release-2026.key --model-version 3
  yugami-keys sign runs/screw --key ~/yugami-keys/release-2026.key
  # who signed it, and would a box trusting these keys accept it?
  yugami-keys show runs/screw --trust ~/yugami-keys/release-2026.pub

Rotation: generate a new pair, add its .pub to every box beside the old one, sign new bundles with the
new key, and remove the old .pub once no box runs a bundle signed with it.
Exit status: 0 done (show: verified, or nothing to verify); 1 show --trust: the bundle would be refused;
2 bad input. See docs/FLEET.md, "Keys and signing"."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yugami-keys", description="Ed25519 keys that sign yugami bundles, and the signatures themselves.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", help="write a new key pair NAME.key (private, mode 0600) and NAME.pub",
                       description="Write a new Ed25519 key pair: NAME.key (PKCS8 PEM, mode 0600; stays on the "
                       "workstation) and NAME.pub (goes into every box's bundle_trust.public_keys).")
    g.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the two files")
    g.add_argument("--name", default=DEFAULT_NAME, help=f"file name and signer name (default {DEFAULT_NAME})")
    g.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
    s = sub.add_parser("sign", help="add signature.json to a bundle",
                       description="Sign a bundle: signature.json over its manifest, which pins every file by "
                       "sha256. A bundle whose files do not match its manifest is not signed.")
    s.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder written by yugami-train")
    s.add_argument("--key", type=Path, required=True, metavar="KEY", help="private key file (NAME.key)")
    s.add_argument("--signer", default=None, metavar="NAME",
                   help="label stored in the signature (default: the key's file name); boxes report the name of "
                   "their own trusted .pub file instead, since a label can be edited")
    w = sub.add_parser("show", help="a key's id, or who signed a bundle and whether it verifies",
                       description="For a key file: its key id. For a bundle folder: model, version, key id, "
                       "signer, and with --trust whether a box trusting those keys would accept it.")
    w.add_argument("target", type=Path, metavar="FILE|BUNDLE", help="a .pub / .key file or a bundle folder")
    w.add_argument("--trust", type=Path, nargs="+", default=[], metavar="PUB",
                   help="public key files to verify a bundle against (as bundle_trust.public_keys)")
    w.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _print(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "generate":
        private, public = generate_keypair(args.out, args.name, force=args.force)
        kid = key_id(load_public_key(public))
        print(f"key id {kid}\nprivate key {private} (mode 0600: keep it on this workstation, back it up)\n"
              f"public key  {public} (add it to each box's bundle_trust.public_keys)")
        return EXIT_OK
    if args.command == "sign":
        doc = sign_bundle(args.bundle, args.key, args.signer)
        print(f"signed {args.bundle}: key id {doc['key_id']}, signer {doc['signer']}, manifest sha256 "
              f"{doc['manifest_sha256'][:12]}...")
        return EXIT_OK
    target: Path = args.target
    if target.is_dir():
        info = describe_bundle(target, args.trust)
        _print(info, args.json)
        return EXIT_FAILED if info.get("verified") is False else EXIT_OK
    if args.trust:
        raise KeysError("--trust goes with a bundle folder, not a key file")
    _print(describe_key(target), args.json)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except KeysError as exc:
        print(f"yugami-keys: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
