"""The Evaluation page's source: the newest chronorec-eval report under a folder, its Markdown as safe HTML blocks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup, escape

REPORT_FILE = "report.md"
# Folders searched below the reports folder: the folder itself, and one or two levels of runs.
MAX_DEPTH = 2
# A plot a report names: a plain file name in the report's own folder, never a path.
PLOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\.png")
# The report's size the page renders (chronorec-eval's are tens of kB).
MAX_REPORT_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Report:
    folder: Path
    modified: float
    html: Markup
    plots: list[str]


def latest_report(root: Path) -> Path | None:
    """The folder of the newest report.md at most MAX_DEPTH levels below `root`."""
    candidates = []
    for depth in range(MAX_DEPTH + 1):
        pattern = "/".join(["*"] * depth + [REPORT_FILE])
        for path in root.glob(pattern):
            if path.is_file() and not path.is_symlink():
                candidates.append((path.stat().st_mtime, path.parent))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def load_report(root: Path) -> Report | None:
    """The newest report under `root`, rendered; None when there is none. Blocking (disk)."""
    folder = latest_report(root)
    if folder is None:
        return None
    path = folder / REPORT_FILE
    with open(path, "rb") as handle:
        text = handle.read(MAX_REPORT_BYTES).decode("utf-8", "replace")
    plots: list[str] = []
    html = render_markdown(text, plots)
    return Report(folder, path.stat().st_mtime, html, [p for p in plots if (folder / p).is_file()])


def plot_path(root: Path, name: str) -> Path | None:
    """The plot `name` of the newest report, when it is a plain PNG name in that report's folder."""
    if not PLOT_NAME.fullmatch(name):
        return None
    folder = latest_report(root)
    if folder is None:
        return None
    path = folder / name
    return path if path.is_file() and not path.is_symlink() else None


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text: str) -> Markup:
    """Escaped text with `code` and **bold** (the only inline forms report.md uses)."""
    out = str(escape(text))
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    out = _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", out)
    return Markup(out)


def _table(rows: list[str]) -> str:
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    body = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
    head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
    lines = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>'


def render_markdown(text: str, plots: list[str]) -> Markup:
    """The subset of Markdown chronorec-eval writes (headings, paragraphs, lists, pipe tables and
    images of its own plots) as HTML; every piece of text is escaped. Plot names found are
    appended to `plots`; an image that is not a plain PNG name in the report's folder is dropped."""
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
            continue
        if line.lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(lines[i])
                i += 1
            blocks.append(_table(rows))
            continue
        heading = re.match(r"(#{1,4})\s+(.*)", line)
        if heading:
            level = min(len(heading.group(1)) + 1, 5)  # the page has its own h1
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif _IMAGE.fullmatch(line.strip()):
            match = _IMAGE.fullmatch(line.strip())
            name = match.group(2)
            if PLOT_NAME.fullmatch(name):
                plots.append(name)
                blocks.append(f'<figure><img src="/evaluation/plots/{escape(name)}" alt="{escape(match.group(1))}"></figure>')
        elif line.lstrip().startswith("- "):
            items = []
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            blocks.append("<ul>" + "".join(items) + "</ul>")
            continue
        else:
            paragraph = [line.strip()]
            while i + 1 < len(lines) and lines[i + 1].strip() and not lines[i + 1].lstrip().startswith(("|", "#", "- ", "![")):
                i += 1
                paragraph.append(lines[i].strip())
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
        i += 1
    return Markup("\n".join(blocks))
