"""Model-file hashes in the conventions A1111, kohya and sd-webui-additional-networks use.

* sha256_file: whole-file SHA-256 (A1111/Civitai "SHA256"; kohya's ss_new_sd_model_hash); cached_sha256 remembers it
  per file version, because hashing a 7 GB SDXL checkpoint takes longer than loading it.
* legacy_file_hash: 8 hex of SHA-256 over 64 KiB at offset 1 MiB (A1111's old hash; ss_sd_model_hash).
* safetensors_data_hash / legacy_bytes_hash: the addnet pair kohya writes into a LoRA as
  sshs_model_hash / sshs_legacy_hash, computed over the file serialised with only ss_* metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from ..atomic import atomic_write_json
from ..cachedir import cache_root

_BLOCK = 1 << 20
log = logging.getLogger("emolora.model")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def _hash_cache_path() -> str:
    return os.path.join(cache_root(), "model_hashes.json")


def _version(st: os.stat_result) -> list[int]:
    # A changed file gets a new mtime or size; one replaced by a rename (a download, an atomic write) a new inode.
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def cached_sha256(path: str) -> str:
    """sha256_file(path), read from <cache>/model_hashes.json when the file's (size, mtime, inode) are those it was
    hashed at; otherwise hashed and recorded (atomically). Only the file's metadata is read on a hit."""
    path = os.path.abspath(path)
    version = _version(os.stat(path))
    cache_file = _hash_cache_path()
    try:
        with open(cache_file, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        entries = {}
    except (OSError, ValueError) as exc:
        log.warning("model hash cache %s is unreadable (%s); it will be rebuilt", cache_file, exc)
        entries = {}
    entry = entries.get(path)
    if isinstance(entry, dict) and entry.get("version") == version and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    if _version(os.stat(path)) == version:  # not modified while it was being hashed
        entries = {p: e for p, e in entries.items() if os.path.exists(p)}  # forget deleted files
        entries[path] = {"version": version, "sha256": digest}
        try:
            atomic_write_json(cache_file, entries)
        except OSError as exc:  # a read-only cache folder costs a rehash next time, nothing else
            log.warning("could not record the model hash in %s (%s)", cache_file, exc)
    return digest


def legacy_file_hash(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def safetensors_data_hash(data: bytes) -> str:
    """SHA-256 of the tensor bytes after the safetensors header (independent of the metadata)."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()


def legacy_bytes_hash(data: bytes) -> str:
    return hashlib.sha256(memoryview(data)[0x100000:0x110000]).hexdigest()[:8]
