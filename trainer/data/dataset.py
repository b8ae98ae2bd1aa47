"""Scan a training folder: images with same-stem captions, kohya `N_name` repeat folders, a line per bad file.

Every image is decoded once here, so a truncated or unreadable file is reported (and skipped) before any
model loads, and its sha256 (the cache key) and size (for the bucket) are known up front.
"""

import dataclasses
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMAGE_EXTENSIONS, ImageError, load_image
from .masks import MASK_SUFFIX, is_mask_stem, mask_file_for, read_mask

log = logging.getLogger("emolora.data")

CAPTION_EXTENSIONS = (".txt", ".caption")
_KOHYA_DIR = re.compile(r"^(\d+)_(.*)$")


class DatasetError(ValueError):
    """The data folder cannot be trained on (missing, or no usable image); the message names the folder."""


@dataclass(frozen=True)
class DataItem:
    image: Path
    caption: str
    repeats: int
    sha256: str  # of the file's bytes: an edited image gets a new key, so nothing stale is read from a cache
    size: tuple[int, int]  # (width, height) after EXIF orientation
    mask: Path | None = None  # the loss mask's file (the image itself for alpha masks); None: the whole image
    mask_channel: str = "L"  # "L": the mask file's luminance, "A": the alpha channel
    is_reg: bool = False  # a regularization (class) image: its loss is weighted by prior_loss_weight


@dataclass(frozen=True)
class ReportLine:
    path: Path
    action: str  # "skipped" (not trained on), "converted" (trained on after a conversion), "ignored", "note"
    reason: str

    def __str__(self) -> str:
        return f"{self.action}: {self.path}: {self.reason}"


@dataclass
class DatasetReport:
    root: Path
    lines: list = field(default_factory=list)
    images: int = 0
    samples_per_epoch: int = 0
    folders: dict = field(default_factory=dict)  # folder (relative) -> (repeats, images)
    reg: dict | None = None  # regularization images: {"dirs": {folder: {n_repeats, img_count}}, "samples": n}

    def add(self, path: Path, action: str, reason: str) -> None:
        line = ReportLine(path, action, reason)
        self.lines.append(line)
        (log.warning if action in ("skipped", "ignored") else log.info)("%s", line)

    def count(self, action: str) -> int:
        return sum(1 for line in self.lines if line.action == action)

    def summary(self) -> str:
        parts = [f"{self.images} images ({self.samples_per_epoch} samples per epoch with repeats) "
                 f"in {self.root}"]
        for action in ("skipped", "converted", "ignored"):
            if n := self.count(action):
                parts.append(f"{n} {action}")
        return "; ".join(parts)

    def text(self) -> str:
        return "\n".join([*map(str, self.lines), self.summary()]) + "\n"


def _repeats_and_token(rel_dir: Path, default_repeats: int) -> tuple[int, str | None]:
    """The nearest `N_name` folder between the file and the root gives the repeats and the class token."""
    for part in reversed(rel_dir.parts):
        if m := _KOHYA_DIR.match(part):
            return int(m.group(1)), m.group(2).strip() or None
    return default_repeats, None


def _read_caption(path: Path) -> str:
    text = path.read_bytes().decode("utf-8-sig")  # UnicodeDecodeError handled by the caller
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def scan_dataset(root, *, caption_extensions=CAPTION_EXTENSIONS, default_repeats: int = 1, mask: str = "off"):
    """Walk `root` recursively -> (items sorted by path, report). Raises DatasetError if nothing is usable.
    mask: "file" pairs each image with its `<stem>_mask.png`, "alpha" uses the image's alpha channel; a
    `<stem>_mask` file is never a training image of its own."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"data path is not a folder: {root}")
    caption_extensions = tuple("." + e.lower().lstrip(".") for e in caption_extensions)
    report = DatasetReport(root)
    items: list[DataItem] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # hidden dirs hold caches, VCS
        rel_dir = Path(dirpath).relative_to(root)
        repeats, class_token = _repeats_and_token(rel_dir, default_repeats)
        groups: dict[str, dict[str, list[Path]]] = {}
        for name in sorted(filenames):
            if name.startswith("."):
                continue  # .DS_Store and friends are not worth a line each
            path = Path(dirpath) / name
            stem, ext = os.path.splitext(name)
            kind = "image" if ext.lower() in IMAGE_EXTENSIONS else (
                "caption" if ext.lower() in caption_extensions else "other")
            groups.setdefault(stem, {"image": [], "caption": [], "other": []})[kind].append(path)
        n_before = len(items)
        image_stems = {stem for stem, g in groups.items() if g["image"]}
        images_by_stem = {stem: g["image"] for stem, g in groups.items()}
        for stem in sorted(groups):
            g = groups[stem]
            if is_mask_stem(stem, image_stems):
                if mask != "file":
                    for path in g["image"]:
                        report.add(path, "ignored", "a loss mask, and masked loss is off (mask='file' uses it)")
                continue
            for path in g["other"]:
                report.add(path, "ignored", "not an image or a caption file")
            captions = sorted(g["caption"], key=lambda p: caption_extensions.index(p.suffix.lower()))
            for extra in captions[1:]:
                report.add(extra, "ignored", f"a second caption file; {captions[0].name} is used")
            if not g["image"]:
                for path in captions[:1]:
                    report.add(path, "skipped", "caption without an image")
                continue
            for image in g["image"]:
                if repeats < 1:
                    report.add(image, "skipped", "its kohya folder (N_name) has a repeat count of 0")
                    continue
                item = _make_item(image, captions[0] if captions else None, repeats, class_token, report)
                if item is not None and mask != "off":
                    item = _with_mask(item, mask, images_by_stem, report)
                if item is not None:
                    items.append(item)
        if len(items) > n_before:
            report.folders[str(rel_dir)] = (repeats, len(items) - n_before)
    report.images = len(items)
    report.samples_per_epoch = sum(it.repeats for it in items)
    log.info("data: %s", report.summary())
    if not items:
        hint = f" ({len(report.lines)} files reported above)" if report.lines else ""
        raise DatasetError(f"no usable image with a caption in {root}{hint}")
    return items, report


def _with_mask(item: DataItem, mode: str, images_by_stem: dict, report) -> DataItem | None:
    """The item with its checked mask; a bad mask file skips the image (training it unmasked would teach what
    the mask was meant to hide), a missing one trains the whole image with a note."""
    path, channel = (mask_file_for(item.image, images_by_stem), "L") if mode == "file" else (item.image, "A")
    if path is None:
        report.add(item.image, "note", f"no mask file ({item.image.stem}{MASK_SUFFIX}.png): the whole image trains")
        return item
    try:
        read_mask(path, channel, item.size)
    except ImageError as e:
        if mode == "alpha":
            report.add(item.image, "note", f"{e}: the whole image trains")
            return item
        report.add(item.image, "skipped", str(e))
        return None
    except OSError as e:
        report.add(item.image, "skipped", f"cannot read its mask {path.name}: {e.strerror or e}")
        return None
    return dataclasses.replace(item, mask=path, mask_channel=channel)


def _make_item(image: Path, caption_file, repeats, class_token, report) -> DataItem | None:
    if caption_file is not None:
        try:
            caption = _read_caption(caption_file)
        except UnicodeDecodeError:
            report.add(image, "skipped", f"its caption {caption_file.name} is not UTF-8 text")
            return None
        except OSError as e:
            report.add(image, "skipped", f"cannot read its caption {caption_file.name}: {e.strerror or e}")
            return None
    elif class_token:
        caption = class_token
    else:
        report.add(image, "skipped", "image without a caption (.txt or .caption with the same name)")
        return None
    try:
        data = image.read_bytes()
        img, note = load_image(data)
    except ImageError as e:
        report.add(image, "skipped", str(e))
        return None
    except OSError as e:
        report.add(image, "skipped", f"cannot read: {e.strerror or e}")
        return None
    token_note = None if caption_file else f"no caption file; the folder's class token {caption!r} is used"
    if note or token_note:
        report.add(image, "converted" if note else "note", "; ".join(n for n in (note, token_note) if n))
    return DataItem(image, caption, repeats, hashlib.sha256(data).hexdigest(), img.size)


def balance_regularization(reg_items: list, n_train: int) -> tuple[list, int]:
    """kohya's balance of regularization images: as many reg samples per epoch as training samples (`n_train`,
    repeats counted). The images in path order, each with its folder's repeats, until n_train is reached (the
    last one cut to fit: kohya lets it overshoot); a smaller set then gets one more repeat per image, round robin,
    until it is. -> (the reg items that train, each marked is_reg with the repeats it gets, number left unused)."""
    counts, n = [0] * len(reg_items), 0
    for i, it in enumerate(reg_items):
        if n >= n_train:
            break
        counts[i] = min(it.repeats, n_train - n)
        n += counts[i]
    if reg_items and n < n_train:  # cycle: +1 per image in order, as many rounds as it takes
        rounds, rest = divmod(n_train - n, len(reg_items))
        counts = [c + rounds + (1 if i < rest else 0) for i, c in enumerate(counts)]
    used = [dataclasses.replace(it, repeats=c, is_reg=True) for it, c in zip(reg_items, counts) if c]
    return used, len(reg_items) - len(used)


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """-> (training items, validation items): round(fraction x n) images (at least 1, and at least 1 left to
    train on) held out, chosen by content and seed, so the same folder always splits the same way whatever
    the file order."""
    if not fraction:
        return list(items), []
    if len(items) < 2:
        raise DatasetError(f"validation_split needs at least 2 images, the data folder has {len(items)}")
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    ranked = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}|{items[i].sha256}".encode()).digest())
    held = set(ranked[:n_val])
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]
