"""Find and load the two SDXL CLIP tokenizers offline, and write small CLIP BPE vocabularies.

Single-file checkpoints carry no tokenizer, and nothing may be downloaded, so the tokenizer comes
from (in order) a diffusers folder, an explicit directory, a `<stem>_tokenizer/` folder beside the
checkpoint, or ComfyUI's bundled `comfy/sd1_tokenizer` (the same CLIP BPE vocabulary SDXL uses).
"""

from __future__ import annotations

import importlib.util
import json
import os

from .errors import ModelError

BIGG_PAD = "!"  # SDXL's OpenCLIP tokenizer pads with "!" (id 0); CLIP-L pads with <|endoftext|>


def _is_vocab_dir(path: str) -> bool:
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return (has("vocab.json") and has("merges.txt")) or has("tokenizer.json")


def _pair_in(folder: str) -> tuple[str, str] | None:
    """(tokenizer, tokenizer_2) dirs inside a diffusers-style folder, or one vocab dir used for both."""
    t1, t2 = os.path.join(folder, "tokenizer"), os.path.join(folder, "tokenizer_2")
    if _is_vocab_dir(t1):
        return t1, (t2 if _is_vocab_dir(t2) else t1)
    if _is_vocab_dir(folder):
        return folder, folder
    return None


def comfy_tokenizer_dir() -> str | None:
    """ComfyUI's bundled CLIP tokenizer, located without importing comfy (find_spec of a top-level
    package does not execute it)."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else ():
        path = os.path.join(root, "sd1_tokenizer")
        if _is_vocab_dir(path):
            return path
    return None


def sidecar_dir(checkpoint: str) -> str:
    """Where a tokenizer shipped with a single-file checkpoint lives: `<stem>_tokenizer/` beside it."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"{stem}_tokenizer")


def resolve(checkpoint: str, tokenizer_dir: str | None) -> tuple[str, str]:
    """Tokenizer directories for (te1, te2), or ModelError explaining how to provide one."""
    if os.path.isdir(checkpoint):
        pair = _pair_in(checkpoint)
        if pair and os.path.isdir(os.path.join(checkpoint, "tokenizer_2")):
            return pair
    if tokenizer_dir is not None:
        tokenizer_dir = os.fspath(tokenizer_dir)
        pair = _pair_in(tokenizer_dir) if os.path.isdir(tokenizer_dir) else None
        if pair is None:
            raise ModelError(
                f"tokenizer dir {tokenizer_dir} has neither tokenizer/ + tokenizer_2/ subfolders nor "
                "vocab.json + merges.txt"
            )
        return pair
    for candidate in (sidecar_dir(checkpoint), comfy_tokenizer_dir()):
        if candidate and os.path.isdir(candidate) and (pair := _pair_in(candidate)):
            return pair
    raise ModelError(
        f"no CLIP tokenizer found for {checkpoint}: single-file checkpoints carry none and nothing is "
        "downloaded. Pass --tokenizer DIR (a diffusers SDXL folder's tokenizer/ + tokenizer_2/, or one folder "
        "with vocab.json + merges.txt), or run inside ComfyUI, whose comfy/sd1_tokenizer is used automatically."
    )


def load_pair(dir1: str, dir2: str, max_length: int = 77):
    from transformers import CLIPTokenizer

    try:
        tok1 = CLIPTokenizer.from_pretrained(dir1, local_files_only=True)
        tok2 = CLIPTokenizer.from_pretrained(dir2, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load CLIP tokenizer from {dir1} / {dir2}: {exc}") from exc
    tok1.pad_token = tok1.eos_token
    if BIGG_PAD not in tok2.get_vocab():
        raise ModelError(f"tokenizer {dir2} has no '{BIGG_PAD}' token for SDXL's bigG padding")
    tok2.pad_token = BIGG_PAD
    for tok in (tok1, tok2):
        tok.model_max_length = max_length  # a bare vocab folder reports an "infinite" max length
    return tok1, tok2


# ------------------------------------------------------------------ offline BPE generation
def _byte_symbols() -> list[str]:
    """CLIP/GPT-2 byte-to-unicode table in vocabulary order: printable bytes keep their own
    character, the rest are shifted above 255 so every byte has a visible, unique symbol."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def write_bpe(folder: str, merges: list[str], *, pad_token: str = "<|endoftext|>", max_length: int = 77) -> int:
    """Write a CLIP-style vocab.json + merges.txt (+ tokenizer_config.json); returns the vocab size.

    Layout matches CLIP's: 256 byte symbols, the same with '</w>', one token per merge, then
    <|startoftext|> and <|endoftext|> last (so the EOS id is the largest, as in CLIP).
    """
    base = _byte_symbols()
    tokens = base + [b + "</w>" for b in base]
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    return len(tokens)
