"""Real page layouts (docs/DESIGN.md §6d): PubLayNet-style COCO annotations, or layouts
extracted from typeset PDFs with PyMuPDF.

A layout is one page: its elements' classes (indices into CLASSES) and boxes (x0, y0, x1, y1)
normalised to the page (x right, y down), in reading order (top to bottom, then left to right).

PDF heuristics (`extract_pdf`), and their limits:
- text: PyMuPDF's text blocks. A block whose largest font is at least HEADING_RATIO × the
  document's body size (the most common span size, by characters) is a `title`; a block whose
  first line starts with a bullet or an enumeration label is a `list`; the rest are `text`.
  Limits: a heading set in the body size (bold only) stays text; a list without markers stays text.
- table: `page.find_tables()` (ruled or aligned cells); text blocks inside a table are dropped.
  Limits: tables without rules or clear column gaps are missed.
- figure: image blocks, and clusters of vector drawings (`page.cluster_drawings()`) of at least
  MIN_FIGURE_AREA of the page. Limits: a rule or a box around text becomes a figure when it is
  large enough; figures made of text (a verbatim listing) stay text.
Pages with no element, or more than MAX_ELEMENTS, are left out.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgraft.errors import PgraftError

CLASSES = ("text", "title", "list", "table", "figure")  # PubLayNet's categories, in its order
MAX_ELEMENTS = 16  # elements per layout (the model's sequence length)
HEADING_RATIO = 1.15  # a block this much larger than the body font is a heading
MIN_FIGURE_AREA = 0.01  # drawings smaller than this fraction of the page are not figures
PAGE_TOLERANCE = 0.01  # COCO boxes may exceed the page by this fraction (rounding) before it is an error
LIST_MARKER = re.compile(r"^\s*([•◦▪‣∙·\-–—*]|\(?\d{1,3}[.)]|\(?[a-z][.)]|\(?[ivx]{1,4}[.)])\s")


class LayoutDataError(PgraftError):
    """A layout source cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Layout:
    classes: tuple[int, ...]  # CLASSES indices
    boxes: tuple[tuple[float, float, float, float], ...]  # (x0, y0, x1, y1) on the unit page
    source: str  # file and page or image id, for messages and the corpus record

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self.classes, np.int64), np.array(self.boxes, np.float64).reshape(-1, 4)


def reading_order(classes: list[int], boxes: list[tuple[float, ...]]) -> tuple[tuple[int, ...], tuple[tuple[float, ...], ...]]:
    order = sorted(range(len(boxes)), key=lambda i: (round(boxes[i][1], 3), boxes[i][0]))
    return tuple(classes[i] for i in order), tuple(tuple(float(v) for v in boxes[i]) for i in order)


# COCO ----------------------------------------------------------------------------------------

def load_coco(path: str | Path) -> list[Layout]:
    """Layouts of a COCO annotation file (PubLayNet's format: `images` with width and height,
    `annotations` with image_id, category_id and bbox [x, y, w, h] in pixels, `categories`
    named as CLASSES). Unknown categories and boxes outside their page are one-line errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LayoutDataError(f"{path}: no such COCO file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayoutDataError(f"{path}: not a JSON file ({exc.__class__.__name__})") from None
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise LayoutDataError(f"{path}: not a COCO annotation file (no {', '.join(missing)})")
    names = {c["id"]: c["name"] for c in data["categories"]}
    unknown = sorted({name for name in names.values() if name not in CLASSES})
    if unknown:
        raise LayoutDataError(f"{path}: unknown categories {unknown}; layouts know {list(CLASSES)}")
    pages = {image["id"]: image for image in data["images"]}
    elements: dict[int, list] = {}
    for ann in data["annotations"]:
        image = pages.get(ann["image_id"])
        if image is None:
            raise LayoutDataError(f"{path}: annotation {ann.get('id')} names image {ann['image_id']}, which is not listed")
        if ann["category_id"] not in names:
            raise LayoutDataError(f"{path}: annotation {ann.get('id')} has category {ann['category_id']}, which is not listed")
        w, h = float(image["width"]), float(image["height"])
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        box = (x / w, y / h, (x + bw) / w, (y + bh) / h)
        if min(box) < -PAGE_TOLERANCE or max(box) > 1 + PAGE_TOLERANCE or bw <= 0 or bh <= 0:
            raise LayoutDataError(f"{path}: annotation {ann.get('id')} of image {image['id']} "
                                  f"({image.get('file_name', '?')}) has box {ann['bbox']} outside its {w:g}×{h:g} page")
        box = tuple(min(max(v, 0.0), 1.0) for v in box)
        elements.setdefault(image["id"], []).append((CLASSES.index(names[ann["category_id"]]), box))
    layouts = []
    for image_id, found in sorted(elements.items()):
        if len(found) > MAX_ELEMENTS:
            continue
        classes, boxes = reading_order([c for c, _ in found], [b for _, b in found])
        layouts.append(Layout(classes, boxes, f"{path.name}#{image_id}"))
    return layouts


# PDF -----------------------------------------------------------------------------------------

def _body_size(document) -> float:
    sizes: Counter = Counter()
    for page in document:
        for block in page.get_text("dict")["blocks"]:
            for line in block.get("lines", []):
                for span in line["spans"]:
                    sizes[round(span["size"], 1)] += len(span["text"].strip())
    return sizes.most_common(1)[0][0] if sizes else 0.0


def _inside(box, outer, slack: float = 2.0) -> bool:
    return box[0] >= outer[0] - slack and box[1] >= outer[1] - slack and box[2] <= outer[2] + slack and box[3] <= outer[3] + slack


def _page_elements(page, body: float) -> list[tuple[int, tuple[float, ...]]]:
    found: list[tuple[int, tuple[float, ...]]] = []
    tables = [tuple(t.bbox) for t in page.find_tables().tables]
    found += [(CLASSES.index("table"), box) for box in tables]
    for block in page.get_text("dict")["blocks"]:
        box = tuple(block["bbox"])
        if block["type"] == 1:  # an image
            found.append((CLASSES.index("figure"), box))
            continue
        spans = [span for line in block.get("lines", []) for span in line["spans"] if span["text"].strip()]
        if not spans or any(_inside(box, table) for table in tables):
            continue
        first = "".join(span["text"] for span in block["lines"][0]["spans"])
        if body and max(span["size"] for span in spans) >= HEADING_RATIO * body:
            kind = "title"
        elif LIST_MARKER.match(first):
            kind = "list"
        else:
            kind = "text"
        found.append((CLASSES.index(kind), box))
    area = page.rect.width * page.rect.height
    for rect in page.cluster_drawings():
        box = tuple(rect)
        if rect.width * rect.height >= MIN_FIGURE_AREA * area and not any(_inside(box, t) for t in tables):
            found.append((CLASSES.index("figure"), box))
    return found


def pages_to_read(count: int, max_pages: int | None) -> list[int]:
    """Every page, or `max_pages` of them evenly spread over the document (deterministic)."""
    if max_pages is None or count <= max_pages:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, max_pages).round()})


def extract_pdf(path: str | Path, max_pages: int | None = None) -> list[Layout]:
    """The layouts of the pages of a PDF, all or `max_pages` spread over it (module docstring: the
    heuristics and their limits)."""
    import pymupdf

    path = Path(path)
    try:
        document = pymupdf.open(path)
    except (pymupdf.FileNotFoundError, pymupdf.FileDataError, RuntimeError) as exc:
        raise LayoutDataError(f"{path}: cannot open as a PDF ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    layouts = []
    with document:
        body = _body_size(document)
        for number in pages_to_read(len(document), max_pages):
            page = document[number]
            found = _page_elements(page, body)
            if not found or len(found) > MAX_ELEMENTS:
                continue
            w, h = page.rect.width, page.rect.height
            boxes = [tuple(min(max(v, 0.0), 1.0) for v in (b[0] / w, b[1] / h, b[2] / w, b[3] / h)) for _, b in found]
            classes, boxes = reading_order([c for c, _ in found], boxes)
            layouts.append(Layout(classes, boxes, f"{path.name}#p{number + 1}"))
    return layouts
