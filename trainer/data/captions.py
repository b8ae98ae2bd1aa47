"""Caption augmentation: whole-caption dropout, tag dropout and tag shuffle that keep the first tokens.

Only usable when text-encoder outputs are not cached (a cached embedding is of one fixed string).
"""

import numpy as np


def process_caption(caption: str, rng: np.random.Generator, *, shuffle: bool = False, keep_tokens: int = 0,
                    separator: str = ",", tag_dropout: float = 0.0, caption_dropout: float = 0.0) -> str:
    """One training view of `caption`; the first `keep_tokens` tags (trigger words) stay first and always."""
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""  # trains the unconditional branch, which classifier-free guidance relies on
    if not shuffle and tag_dropout <= 0:
        return caption
    tags = [t.strip() for t in caption.split(separator)]
    tags = [t for t in tags if t]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout]
    if shuffle:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return (separator.strip() + " ").join(fixed + rest) if separator.strip() else " ".join(fixed + rest)
