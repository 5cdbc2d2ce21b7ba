"""The report page: its sections, `report.md` linking each section's plots, and the same page with
the plots inlined for places that have no directory (a Prefect artifact)."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPORT_FILE = "report.md"
"""The report page, in the directory of its plots."""


class ReportError(ValueError):
    """Bad report input (a missing image, a record without the text field); the message says what to fix."""


@dataclass
class ReportSection:
    """One `##` section of the report: markdown body (tables, prose) followed by images.

    Attributes:
        heading: the section title.
        body: markdown shown under the heading.
        images: PNG paths; linked relative to the report's directory, so they must exist.
    """

    heading: str
    body: str = ""
    images: list[str | Path] = field(default_factory=list)


def _image_link(image: str | Path, out_dir: Path) -> str:
    path = Path(image).resolve()
    if not path.is_file():
        raise ReportError(f"report image {image} does not exist; write the plot before the report")
    rel = Path(os.path.relpath(path, out_dir.resolve())).as_posix()
    return f"![{path.stem}]({rel})"


def write_report(out_dir: str | Path, *, title: str, sections: Sequence[ReportSection]) -> Path:
    """Write `report.md` in `out_dir`: the title, then each section's heading, body and images.

    Images are linked by paths relative to `out_dir`, so the directory can be moved or uploaded whole.

    Returns:
        The path of `report.md`.

    Raises:
        ReportError: an image file does not exist.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.heading}", ""]
        if section.body.strip():
            parts += [section.body.strip(), ""]
        parts += [line for image in section.images for line in (_image_link(image, out), "")]
    path = out / REPORT_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


_IMAGE_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")


def embed_images(markdown: str, base_dir: str | Path) -> str:
    """`markdown` with every relative PNG link replaced by an inline `data:` URI.

    A report shown where its files are not (a Prefect artifact in the UI, a chat message) has no
    directory to resolve relative links against, so the pictures must travel inside the text.

    Raises:
        ReportError: a linked image is missing, or is not a PNG.
    """
    base = Path(base_dir)

    def inline(match: re.Match[str]) -> str:
        src = match["src"]
        if src.startswith(("data:", "http://", "https://")):
            return match[0]
        path = base / src
        if not path.is_file():
            raise ReportError(
                f"report image {src} does not exist under {base}; write the plot before embedding"
            )
        data = path.read_bytes()
        if not data.startswith(b"\x89PNG"):
            raise ReportError(f"report image {path} is not a PNG; only PNG plots can be embedded")
        return f"![{match['alt']}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"

    return _IMAGE_LINK.sub(inline, markdown)
