import logging

import numpy as np
import pytest
from _trainer_helpers import make_bad_folder, photo, write_item
from PIL import Image

from trainer.data import DatasetError, ImageError, load_image, scan_dataset


def test_bad_files_get_exactly_one_line_each_and_good_ones_are_kept(tmp_path, caplog):
    good, bad = make_bad_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="emolora.data"):
        items, report = scan_dataset(tmp_path / "data")
    by_file = {}
    for line in report.lines:
        by_file.setdefault(line.path.name, []).append(line)
    assert sorted(by_file) == sorted(bad), report.text()
    for name, lines in by_file.items():
        assert len(lines) == 1, lines
        assert lines[0].action == bad[name], lines[0]
        assert name in str(lines[0])
    kept = sorted(it.image.stem for it in items)
    assert kept == sorted(good + ["cmyk", "gray16", "rgb16", "rgba"])
    # the log got the same one line per file, plus the summary
    logged = [r.getMessage() for r in caplog.records]
    for name in bad:
        assert sum(name in m for m in logged if not m.startswith("data:")) == 1, name
    assert "7 images" in report.summary() and "4 skipped" in report.summary() and "4 converted" in report.summary()


def test_conversions_produce_sane_rgb(tmp_path):
    make_bad_folder(tmp_path)
    items, _ = scan_dataset(tmp_path)
    for it in items:
        img, _ = load_image(it.image.read_bytes())
        assert img.mode == "RGB" and img.size == it.size
    rgba = next(it for it in items if it.image.stem == "rgba")
    img, note = load_image(rgba.image.read_bytes())
    assert "white" in note
    assert np.asarray(img)[0, 0].min() > 240  # fully transparent top-left corner is white now
    g16, note = load_image((tmp_path / "gray16.png").read_bytes())
    arr = np.asarray(g16)
    assert "16-bit" in note and arr.min() == 0 and arr.max() == 255  # full range kept, not clipped


def test_zero_byte_and_truncated_messages_name_the_problem():
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")
    with pytest.raises(ImageError, match="truncated"):
        load_image(b"\xff\xd8\xff\xe0" + b"\x00" * 20)


def test_exif_orientation_is_applied(tmp_path):
    img = photo((80, 40), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    out, note = load_image((tmp_path / "rot.jpg").read_bytes())
    assert out.size == (40, 80) and note is None


def test_missing_or_empty_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(DatasetError, match="not found: .*nope"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable image .*empty"):
        scan_dataset(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    (tmp_path / "bad" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="1 files reported"):
        scan_dataset(tmp_path / "bad")


def test_kohya_repeat_folders_recursive_and_class_token(tmp_path):
    write_item(tmp_path / "10_sks dog", "a", "sks dog on grass", seed=1)
    write_item(tmp_path / "10_sks dog", "b", None, seed=2)  # no caption: the class token is used
    write_item(tmp_path / "3_style" / "nested", "c", "in a style", seed=3)
    write_item(tmp_path / "plain", "d", "plain folder", seed=4)
    write_item(tmp_path / "0_off", "e", "disabled", seed=5)
    items, report = scan_dataset(tmp_path, default_repeats=2)
    got = {it.image.stem: (it.repeats, it.caption) for it in items}
    assert got == {"a": (10, "sks dog on grass"), "b": (10, "sks dog"), "c": (3, "in a style"),
                   "d": (2, "plain folder")}
    assert report.samples_per_epoch == 10 + 10 + 3 + 2
    assert [(ln.path.stem, ln.action) for ln in report.lines] == [("e", "skipped"), ("b", "note")]


def test_caption_files_bom_multiline_and_extension_priority(tmp_path):
    photo().save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffline one\n\nline two\n".encode())
    (tmp_path / "a.caption").write_text("ignored")
    photo().save(tmp_path / "b.png")
    (tmp_path / "b.caption").write_text("from .caption")
    photo().save(tmp_path / "c.png")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe\xfa bad")
    items, report = scan_dataset(tmp_path)
    assert {it.image.stem: it.caption for it in items} == {"a": "line one line two", "b": "from .caption"}
    assert [(ln.path.name, ln.action) for ln in report.lines] == [("a.caption", "ignored"), ("c.png", "skipped")]
    assert "UTF-8" in report.lines[1].reason


def test_hidden_files_and_folders_are_not_scanned(tmp_path):
    write_item(tmp_path, "a", "x")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    write_item(tmp_path / ".emolora-cache", "b", "cached")
    items, report = scan_dataset(tmp_path)
    assert [it.image.stem for it in items] == ["a"] and report.lines == []


def test_sha256_changes_when_the_file_changes(tmp_path):
    write_item(tmp_path, "a", "x", seed=1)
    (a1,), _ = scan_dataset(tmp_path)
    write_item(tmp_path, "a", "x", seed=2)
    (a2,), _ = scan_dataset(tmp_path)
    assert a1.sha256 != a2.sha256 and len(a1.sha256) == 64
