"""Model-file hashes in the conventions A1111, kohya and sd-webui-additional-networks use.

* sha256_file: whole-file SHA-256 (A1111/Civitai "SHA256"; kohya's ss_new_sd_model_hash).
* legacy_file_hash: 8 hex of SHA-256 over 64 KiB at offset 1 MiB (A1111's old hash; ss_sd_model_hash).
* safetensors_data_hash / legacy_bytes_hash: the addnet pair kohya writes into a LoRA as
  sshs_model_hash / sshs_legacy_hash, computed over the file serialised with only ss_* metadata.
"""

from __future__ import annotations

import hashlib

_BLOCK = 1 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


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
