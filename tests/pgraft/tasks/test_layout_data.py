"""Layout sources: a COCO file the test writes, a PDF the test makes with known boxes."""

from __future__ import annotations

import json

import pytest

from pgraft.tasks.layout.data import CLASSES, LayoutDataError, extract_pdf, load_coco


def coco(tmp_path, annotations, categories=None):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({
        "images": [{"id": 7, "width": 200, "height": 400, "file_name": "p7.png"}],
        "categories": categories or [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
        "annotations": annotations,
    }))
    return path


def test_coco_layouts_are_normalised_and_in_reading_order(tmp_path):
    path = coco(tmp_path, [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 200, 160, 100]},   # text, lower
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [20, 40, 160, 40]},     # title, top
    ])
    [layout] = load_coco(path)
    assert layout.classes == (CLASSES.index("title"), CLASSES.index("text"))
    assert [v for box in layout.boxes for v in box] == pytest.approx([0.1, 0.1, 0.9, 0.2, 0.1, 0.5, 0.9, 0.75])
    assert layout.source == "ann.json#7"


def test_bad_coco_files_are_one_line(tmp_path):
    with pytest.raises(LayoutDataError, match=r"ann.json: unknown categories \['caption'\]"):
        load_coco(coco(tmp_path, [], [{"id": 1, "name": "caption"}]))
    with pytest.raises(LayoutDataError, match=r"annotation 3 of image 7 \(p7.png\) has box \[150, 10, 100, 10\] outside"):
        load_coco(coco(tmp_path, [{"id": 3, "image_id": 7, "category_id": 1, "bbox": [150, 10, 100, 10]}]))
    with pytest.raises(LayoutDataError, match="no such COCO file"):
        load_coco(tmp_path / "none.json")


def test_pdf_extractor_finds_the_boxes_it_was_given(tmp_path):
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=600, height=800)
    assert page.insert_textbox(pymupdf.Rect(60, 50, 540, 110), "A Heading", fontsize=24) > 0  # it fits
    body = "Body text that runs on for a while, set in the body size of the document. " * 3
    page.insert_textbox(pymupdf.Rect(60, 120, 540, 220), body, fontsize=10)
    page.insert_textbox(pymupdf.Rect(60, 240, 540, 300), "1. first item of a list\n2. second item", fontsize=10)
    page.draw_rect(pymupdf.Rect(100, 400, 500, 700), color=(0, 0, 0), fill=(0.5, 0.5, 0.9))  # a drawn figure
    doc.save(tmp_path / "made.pdf")

    [layout] = extract_pdf(tmp_path / "made.pdf")
    kinds = [CLASSES[c] for c in layout.classes]
    assert kinds == ["title", "text", "list", "figure"], kinds
    figure = layout.boxes[3]
    assert figure == pytest.approx((100 / 600, 400 / 800, 500 / 600, 700 / 800), abs=0.01)
    title = layout.boxes[0]
    assert 50 / 800 - 0.01 <= title[1] and title[3] <= 110 / 800 + 0.01


def test_a_file_that_is_not_a_pdf_is_one_line(tmp_path):
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"not a pdf at all")
    with pytest.raises(LayoutDataError, match=r"bad.pdf: cannot open as a PDF"):
        extract_pdf(bad)


def test_an_empty_source_is_one_line_and_writes_no_corpus(tmp_path):
    from pgraft.tasks.layout.task import LayoutTaskError, pretrain_layout

    (tmp_path / "pdfs").mkdir()
    with pytest.raises(LayoutTaskError, match=r"no PDFs under .*pdfs \(Debian: apt-get install texlive-latex-base-doc"):
        pretrain_layout(tmp_path / "out", source=str(tmp_path / "pdfs"), progress=False)
    empty = coco(tmp_path, [])
    with pytest.raises(LayoutTaskError, match=r"layout source .*ann.json gave no layout \(an empty corpus\); nothing was written"):
        pretrain_layout(tmp_path / "out", source=str(empty), progress=False)
    assert not (tmp_path / "out").exists()


def test_layout_prompts_name_known_classes_within_the_length(tmp_path):
    from pgraft.config import ModelSection
    from pgraft.models.adapters import ModelError, load_adapter
    from tiny_models import save_tiny_layout

    adapter = load_adapter(ModelSection(kind="layout_sequence", path=str(save_tiny_layout(tmp_path) / "ddpm"),
                                        num_inference_steps=2, device="cpu"))
    ids = adapter.class_ids(["title text", ""])
    assert ids[0, :3].tolist() == [CLASSES.index("title"), CLASSES.index("text"), len(CLASSES)]  # then PAD
    assert set(ids[1].tolist()) == {len(CLASSES) + 1}  # the empty prompt: NULL everywhere (unconditional)
    with pytest.raises(ModelError, match=r"prompt 'title caption': unknown element class 'caption'"):
        adapter.class_ids(["title caption"])
    with pytest.raises(ModelError, match=r"17 elements, more than 16"):
        adapter.class_ids([" ".join(["text"] * 17)])
