"""Who made a bundle: Ed25519 signatures over the manifest, the keys a box trusts, and bundle versions.

The manifest already pins every file of a bundle by its sha256, so one signature over the raw
``manifest.json`` bytes covers the whole bundle. It lives beside the manifest in ``signature.json``
(not listed in the manifest's ``files``: it signs them):

    {"format": 1, "algorithm": "ed25519", "key_id": "<16 hex>", "signer": "<key name>",
     "signed_at": "<iso>", "manifest_sha256": "<hex>", "signature": "<base64>"}

Only ``signature`` is proof; ``key_id`` picks the trusted key to check it with, ``manifest_sha256`` makes
"the manifest changed after signing" a message of its own, and ``signer`` / ``signed_at`` are labels
anyone could edit. So the name a box reports for a signer is the name of *its* trusted key file
(``release-2026.pub`` -> ``release-2026``), never the label. The workstation signs with ``fleet.keys``,
which calls :func:`signature_document`; this module needs only the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.bundle import BundleError

logger = logging.getLogger(__name__)

SIGNATURE_FILE = "signature.json"
SIGNATURE_FORMAT = 1
ALGORITHM = "ed25519"
KEY_ID_HEX = 16
MAX_SIGNATURE_BYTES = 64 * 1024  # a real signature.json is ~400 bytes; this keeps a wrong file out of memory
SIGN_FIX = "sign it with `yugami-keys sign BUNDLE --key KEY.key` (or yugami-train --sign-key)"


@dataclass(frozen=True)
class Signer:
    """A verified signature: the trusted key that made it, its name on this box, and when (as labelled)."""

    key_id: str
    signer: str
    signed_at: str | None

    def as_dict(self) -> dict[str, Any]:
        """What ``Bundle.signer`` holds and stats / state report."""
        return {"key_id": self.key_id, "name": self.signer, "signed_at": self.signed_at}


@dataclass(frozen=True)
class TrustedKey:
    key: Ed25519PublicKey
    name: str  # the key file's stem
    path: str


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:KEY_ID_HEX]


def key_name(path: str | Path) -> str:
    """The name a key goes by: its file name without ``.pub`` / ``.pem`` / ``.key``."""
    p = Path(path)
    return p.stem if p.suffix in (".pub", ".pem", ".key") else p.name


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; ValueError naming the file and the fix."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {p} ({exc.strerror or exc}); fix the path or its permissions") from exc
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{p} is a private key; give the box the .pub file from `yugami-keys generate` and keep "
                         "the .key on the workstation")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{p} is not a PEM public key ({exc}); give the .pub file written by "
                         "`yugami-keys generate`") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{p} is a {type(key).__name__.lstrip('_')}, not an Ed25519 public key; give the .pub "
                         "file written by `yugami-keys generate`")
    return key


def load_trusted_keys(paths: Iterable[str | Path]) -> dict[str, TrustedKey]:
    """{key id: TrustedKey}; ValueError naming the file for the first that is not an Ed25519 public key."""
    keys: dict[str, TrustedKey] = {}
    for path in paths:
        key = load_public_key(path)
        keys.setdefault(key_id(key), TrustedKey(key, key_name(path), str(path)))  # the same key twice: first name
    return keys


def load_public_keys(paths: Iterable[str | Path]) -> dict[str, Ed25519PublicKey]:
    """{key id: public key} of the given PEM files (ValueError naming the file and the fix)."""
    return {kid: t.key for kid, t in load_trusted_keys(paths).items()}


def signature_document(private_key: Ed25519PrivateKey, manifest_raw: bytes, signer_name: str,
                       signed_at: str | None = None) -> dict[str, Any]:
    """The content of ``signature.json`` for a manifest: the one definition of the format."""
    signature = private_key.sign(manifest_raw)
    return {
        "format": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signer": signer_name,
        "signed_at": signed_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest_sha256": hashlib.sha256(manifest_raw).hexdigest(),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def read_signature(bundle_dir: str | Path) -> dict[str, Any] | None:
    """The bundle's signature document with its fields' types checked, or None when it has none."""
    path = Path(bundle_dir) / SIGNATURE_FILE
    if not path.exists():
        return None

    def bad(problem: str) -> BundleError:
        return BundleError(f"bundle {path}: {problem}; {SIGN_FIX} again")

    if not path.is_file() or path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise bad("is not a signature file")
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise bad(f"is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise bad("must be a JSON object")
    if doc.get("format") != SIGNATURE_FORMAT:
        raise BundleError(f"bundle {path}: unknown signature format {doc.get('format')!r}; this agent reads "
                          f"format {SIGNATURE_FORMAT}. Upgrade the agent, or {SIGN_FIX} with a matching yugami-keys")
    if doc.get("algorithm") != ALGORITHM:
        raise bad(f"algorithm {doc.get('algorithm')!r} is not {ALGORITHM!r}")
    for name, digits in (("key_id", KEY_ID_HEX), ("manifest_sha256", 64)):
        if not isinstance(doc.get(name), str) or not re.fullmatch(f"[0-9a-f]{{{digits}}}", doc[name]):
            raise bad(f"'{name}' must be {digits} lowercase hex digits, not {str(doc.get(name))[:80]!r}")
    if not isinstance(doc.get("signature"), str):
        raise bad("'signature' must be a base64 string")
    return doc


def verify_signature(bundle_dir: str | Path, manifest_raw: bytes, keys: dict[str, Any],
                     require: bool) -> Signer | None:
    """Check the bundle's signature over ``manifest_raw`` (the exact bytes the loader reads).

    ``keys``: {key id: Ed25519PublicKey or TrustedKey}. Returns the Signer, or None for an unsigned bundle
    when ``require`` is false, and for any bundle when no key is trusted (nothing to check it against).
    Raises BundleError saying why it is refused: unsigned, unknown key, manifest changed after signing,
    bad signature."""
    root = Path(bundle_dir)
    doc = read_signature(root)
    if doc is None:
        if require:
            raise BundleError(f"bundle {root}: unsigned (no {SIGNATURE_FILE}) and bundle_trust requires a "
                              f"signature; {SIGN_FIX} with a key this box trusts")
        return None
    if not keys:
        logger.info("bundle %s is signed (key id %s) but bundle_trust names no public keys: not checked",
                    root, doc["key_id"])
        return None
    trusted = keys.get(doc["key_id"])
    if trusted is None:
        known = ", ".join(sorted(keys))
        raise BundleError(f"bundle {root}: signed with unknown key id {doc['key_id']} (trusted: {known}); add that "
                          "key's .pub to bundle_trust.public_keys, or sign the bundle with a trusted key")
    actual = hashlib.sha256(manifest_raw).hexdigest()
    if actual != doc["manifest_sha256"]:
        raise BundleError(f"bundle {root}/manifest.json: changed after signing (signed sha256 "
                          f"{doc['manifest_sha256'][:12]}..., now {actual[:12]}...); copy the bundle again, or "
                          f"re-export it and {SIGN_FIX}")
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"bundle {root}/{SIGNATURE_FILE}: 'signature' is not base64 ({exc}); {SIGN_FIX} "
                          "again") from exc
    public = trusted.key if isinstance(trusted, TrustedKey) else trusted
    try:
        public.verify(signature, manifest_raw)
    except InvalidSignature as exc:
        raise BundleError(f"bundle {root}: bad signature: {SIGNATURE_FILE} does not verify with trusted key "
                          f"{doc['key_id']}; the bundle or its signature was altered. Copy it again, or "
                          f"{SIGN_FIX}") from exc
    name = trusted.name if isinstance(trusted, TrustedKey) else str(doc.get("signer") or doc["key_id"])
    signed_at = doc.get("signed_at") if isinstance(doc.get("signed_at"), str) else None
    return Signer(key_id=doc["key_id"], signer=name, signed_at=signed_at)


# --- versions ----------------------------------------------------------------------------------------

_PART_RE = re.compile(r"[.\-+_]")


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """A sortable key: dotted integers compare as numbers ("1.10" > "1.9"), other parts as strings.

    Trailing zero parts do not count ("1" == "1.0"); a numeric part sorts before a textual one."""
    parts: list[tuple[int, int, str]] = []
    for part in _PART_RE.split(str(version).strip()):
        if part.isdigit():
            parts.append((0, int(part), ""))
        elif part:
            parts.append((1, 0, part))
    while parts and parts[-1] == (0, 0, ""):
        parts.pop()
    return tuple(parts)


def is_downgrade(new: str, current: str) -> bool:
    """True when ``new`` is an older version than ``current`` (the same version is no downgrade)."""
    return version_key(new) < version_key(current)
