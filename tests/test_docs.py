"""The docs cannot drift from the code: the commands and options README.md and docs/*.md name exist, and every
relative link and image points to an existing file (and heading).

What counts as naming an option of a command: a `--option` after `python -m trainer <command>` on the same
command line (a code line, with its backslash continuations, or one inline code span), or in a row of a table
under a heading that names the command (`python -m trainer <command>` or "Options of `<command>`"). Options of
other tools (torchrun, accelerate, pytest, comfy) come before `-m trainer` or outside such places and are not
checked. The ComfyUI node inputs are checked against the live nodes by tests/test_comfy_server.py.
"""

import importlib
import re
from functools import lru_cache
from pathlib import Path

from trainer.cli import build_parser, load_pack

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

COMMAND = re.compile(r"-m trainer\s+([a-z][\w-]*)")
OPTION = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
TABLE_COMMAND = re.compile(r"-m trainer\s+([a-z][\w-]*)`|[Oo]ptions of `([a-z][\w-]*)`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG = re.compile(r"<img\s[^>]*?src=\"([^\"]+)\"", re.I)


@lru_cache(maxsize=1)
def command_options() -> dict:
    """{command: set of its option strings}, from the parsers the commands themselves use (nothing runs)."""
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    out = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}
    panel = importlib.import_module(f"{load_pack().__name__}.web.panel")  # `panel` parses its own flags
    out["panel"] = {s for a in panel.build_parser()._actions for s in a.option_strings}
    return out


def _prose_and_code(text: str):
    """(line, in_code_block) for each line, backslash-continued code lines joined."""
    in_code, pending = False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code and line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line, in_code
        pending = ""


def _command_lines(text: str):
    """(command, the text after it that belongs to it) for every `-m trainer <command>`."""
    for line, in_code in _prose_and_code(text):
        for m in COMMAND.finditer(line):
            rest = line[m.end():]
            if in_code:
                rest = rest.split(" #", 1)[0]  # a shell comment
            elif line[:m.start()].count("`") % 2:  # inside an inline code span: up to its end
                rest = rest.split("`", 1)[0]
            else:
                rest = ""  # prose: "python -m trainer train" without code names no option
            yield m.group(1), rest


def _table_rows(text: str):
    """(command, row) for every table row under a heading that names a command."""
    command = None
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        h = HEADING.match(line)
        if h:
            m = TABLE_COMMAND.search(h.group(2))
            command = (m.group(1) or m.group(2)) if m else None
        elif command and line.lstrip().startswith("|"):
            yield command, line


# Options that prose names in a code span of their own and that belong to other tools (or are a placeholder).
OTHER_TOOLS = {"--unet": "benchmarks/bench_gpu.py", "--fp8_base": "kohya sd-scripts", "--option": "a placeholder"}


def unknown_bare_options(text: str) -> list:
    """Options named in prose as a code span of their own (`--lokr-factor`, `--offload blocks`) that no trainer
    command has: such a span names the trainer's option unless OTHER_TOOLS says whose it is."""
    every = set().union(*command_options().values()) | set(OTHER_TOOLS)
    spans = [span for line, in_code in _prose_and_code(text) if not in_code
             for span in re.findall(r"`([^`\n]*)`", line) if span.lstrip().startswith("--")]
    return sorted({opt for span in spans for opt in OPTION.findall(span) if opt not in every})


def unknown_commands(text: str) -> list:
    known = command_options()
    return sorted({cmd for cmd, _ in _command_lines(text) if cmd not in known})


def undefined_options(text: str) -> list:
    """["command --option", ...] for every option the text names for a command that does not have it."""
    known = command_options()
    named = [(cmd, rest) for cmd, rest in _command_lines(text)] + list(_table_rows(text))
    return sorted({f"{cmd} {opt}" for cmd, rest in named if cmd in known
                   for opt in OPTION.findall(rest) if opt not in known[cmd]})


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markdown marks dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set:
    seen, out = {}, set()
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        h = None if in_code else HEADING.match(line)
        if h:
            s = slug(h.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path, text: str) -> list:
    """Relative links and images of a page (outside code) whose file, or heading in a .md file, does not exist."""
    prose = "\n".join(line for line, in_code in _prose_and_code(text) if not in_code)
    prose = re.sub(r"`[^`\n]*`", "", prose)  # inline code is not a link
    broken = []
    for target in LINK.findall(prose) + IMG.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file)")
        elif anchor and file.suffix == ".md":
            own = text if file == page else file.read_text(encoding="utf-8")
            if anchor not in anchors(own):
                broken.append(f"{target} (no such heading)")
    return broken


def _read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def test_every_page_is_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "training.md", "comfyui.md", "sweep.md", "low-vram.md", "adapters.md"} <= names


def test_every_command_the_docs_name_exists():
    bad = {p.name: unknown_commands(_read(p)) for p in PAGES}
    assert not {k: v for k, v in bad.items() if v}


def test_every_option_the_docs_name_exists_on_its_command():
    bad = {p.name: undefined_options(_read(p)) for p in PAGES}
    assert not {k: v for k, v in bad.items() if v}


def test_every_option_named_alone_is_a_trainer_option():
    bad = {p.name: unknown_bare_options(_read(p)) for p in PAGES}
    assert not {k: v for k, v in bad.items() if v}


def test_the_docs_check_options_at_all():
    """The pages do name options in the places the check reads (else the check above proves nothing)."""
    named = {(cmd, opt) for p in PAGES for cmd, rest in [*_command_lines(_read(p)), *_table_rows(_read(p))]
             for opt in OPTION.findall(rest)}
    assert {("train", "--model"), ("train", "--base-dtype"), ("sweep", "--loss-control"),
            ("panel", "--runs"), ("train", "--resume")} <= named


def test_every_relative_link_and_image_exists():
    bad = {p.name: broken_links(p, _read(p)) for p in PAGES}
    assert not {k: v for k, v in bad.items() if v}


def test_the_checks_catch_drift(tmp_path):
    """A bogus command, option, file and heading in a doc are each reported."""
    doc = "\n".join([
        "# Title",
        "## Options of `train`",
        "| option | meaning |",
        "|---|---|",
        "| `--model`, `--no-such-table-option` | x |",
        "",
        "Run `python -m trainer train --steps 5 --bogus-flag 3` or `python -m trainer trian`.",
        "torchrun --nproc_per_node=2 -m trainer train --model m   # --not-checked in a comment",
        "```bash",
        ".venv/bin/python -m trainer sweep --optimizers all \\",
        "    --steps 5 --output-dir x",
        "```",
        "Prose: `--rank`, `--lokr-factr`, `--network lora --dora-typo`, not `trainer --unchecked`.",
        "[a page](missing.md), ![img](images/none.png), <img src=\"nope.png\">, [ok](#title), [bad](#nowhere)",
    ])
    assert unknown_commands(doc) == ["trian"]
    assert undefined_options(doc) == ["sweep --output-dir", "train --bogus-flag", "train --no-such-table-option"]
    assert unknown_bare_options(doc) == ["--dora-typo", "--lokr-factr", "--no-such-table-option"]
    page = tmp_path / "page.md"
    page.write_text(doc, encoding="utf-8")
    assert broken_links(page, doc) == ["missing.md (no file)", "images/none.png (no file)",
                                       "#nowhere (no such heading)", "nope.png (no file)"]


def test_slug_follows_github():
    assert slug("The benchmark: `benchmarks/bench_gpu.py --vram`") == "the-benchmark-benchmarksbench_gpupy---vram"
    assert slug("Update/weight ratio: is it training at all?") == "updateweight-ratio-is-it-training-at-all"
    assert slug("EmoLoRA Trainer (SDXL)") == "emolora-trainer-sdxl"
