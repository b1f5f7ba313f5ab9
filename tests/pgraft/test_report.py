"""`pgraft report RUN`: one self-contained HTML page, rendered in headless Chromium; every
number it shows equals the run's summaries; local and s3:// runs give the same page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pgraft.report import ReportError, render_report, threshold_sweep, write_report
from pgraft.storage import open_storage

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Figures(HTMLParser):
    """data-figure path → the text of its element; and every <img> src."""

    def __init__(self):
        super().__init__()
        self.figures, self.images, self._open = {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-figure" in attrs:
            self._open = attrs["data-figure"]
            self.figures[self._open] = ""
        if tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_data(self, data):
        if self._open:
            self.figures[self._open] += data

    def handle_endtag(self, tag):
        self._open = None


def parse(page: str) -> Figures:
    figures = Figures()
    figures.feed(page)
    return figures


def chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def expected_figures(run_dir: Path) -> dict[str, float]:
    """Every figure the page should show, read from the run's own summaries."""
    out = {"rounds.complete": 2}
    for rnd in (0, 1):
        root = run_dir / f"round-{rnd:03d}"
        out[f"round{rnd}.generate.samples"] = json.loads((root / "generate/plan.json").read_text())["samples"]
        for stage, entry in json.loads((root / "pipeline.json").read_text())["stages"].items():
            out[f"round{rnd}.pipeline.{stage}.seconds"] = entry["seconds"]
        for summary_file in root.glob("filter/*/summary.json"):
            s = json.loads(summary_file.read_text())
            for key in ("rows_considered", "rows_accepted", "acceptance_rate", "kl", "kl_empirical"):
                out[f"round{rnd}.filter.{s['name']}.{key}"] = s[key]
        for variant, v in json.loads((root / "eval/summary.json").read_text())["variants"].items():
            for key in ("samples", "reward_mean", "reward_stderr", "frechet_distance", "diversity"):
                out[f"round{rnd}.eval.{variant}.{key}"] = v[key]
    return out


def check_figures(shown: dict[str, str], expected: dict[str, float]) -> None:
    assert set(shown) == set(expected)
    for path, value in expected.items():
        text = shown[path].strip()
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert float(text) == pytest.approx(value, abs=0.51 * 10**-decimals), path


@pytest.mark.browser
def test_the_page_renders_in_chromium_and_shows_the_summaries_figures(two_round_run, tmp_path):
    cfg, _ = two_round_run
    out = tmp_path / "report.html"
    assert main(["report", cfg.run.uri, "--out", str(out), "--quiet"]) == 0
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2400", out.as_uri(), tmp_path=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20, "the screenshot is blank"
    dom = chromium("--dump-dom", out.as_uri(), tmp_path=tmp_path).stdout
    page = parse(dom)
    check_figures(page.figures, expected_figures(Path(cfg.run.uri)))
    # Self-contained: every image is embedded, nothing is fetched.
    plots = 1 + 2 * 2  # evaluation; per round a histogram and a trade-off figure
    grid = 2 * 3  # 2 prompts × (base, round 0, round 1)
    assert len(page.images) == plots + grid and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not re.search(r"""(src|href)=["']?(https?:|file:|/)""", out.read_text())


def test_an_s3_run_gives_the_same_page(two_round_run, s3_uri, tmp_path):
    cfg, _ = two_round_run
    open_storage(s3_uri).upload_folder(cfg.run.uri, "")
    local, remote = parse(render_report(cfg.run.uri)), parse(render_report(s3_uri))
    assert remote.figures == local.figures and remote.images == local.images
    path = write_report(s3_uri, out=str(tmp_path / "s3.html"))
    assert Path(path).read_text().count("data-figure") == len(local.figures)


def test_a_selection_on_another_reward_table_gets_its_own_plots(two_round_run, tmp_path):
    from stages.filter import run_filter

    cfg, _ = two_round_run
    run_dir = shutil.copytree(cfg.run.uri, tmp_path / "run")
    shutil.copytree(run_dir / "round-000/rewards/digits_alignment", run_dir / "round-000/rewards/copy")
    other = cfg.model_copy(deep=True)
    other.run.uri, other.run.round, other.reward.table, other.filter.name = str(run_dir), 0, "copy", "top-on-copy"
    run_filter(other, progress=False)
    page = render_report(str(run_dir))
    assert "<h3>Rewards (copy)</h3>" in page and "<h3>Rewards (digits_alignment)</h3>" in page
    assert 'data-figure="round0.filter.top-on-copy.kl"' in page
    assert len(parse(page).images) == len(parse(render_report(cfg.run.uri)).images) + 2


def test_a_half_finished_round_is_shown_as_such(two_round_run, tmp_path):
    cfg, _ = two_round_run
    run_dir = shutil.copytree(cfg.run.uri, tmp_path / "run")
    (run_dir / "round-001/eval/summary.json").unlink()
    page = render_report(str(run_dir))
    assert page.count('data-round-state="incomplete"') == 1
    assert "Round 1 is not finished: evaluate (partial)" in page
    assert "failed" not in page.lower()
    assert "round1.eval.finetuned.reward_mean" not in page and "round0.eval.finetuned.reward_mean" in page


def test_no_finished_round_and_not_a_run_are_one_line(two_round_run, tmp_path, capsys):
    cfg, _ = two_round_run
    run_dir = tmp_path / "run"
    shutil.copytree(cfg.run.uri, run_dir, ignore=shutil.ignore_patterns("train", "eval", "round-001"))
    with pytest.raises(ReportError, match=r"has no finished round yet \(round 0: train missing, evaluate missing\)"):
        render_report(str(run_dir))
    assert main(["report", str(run_dir)]) == 2
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no finished round" in err[0] and "is not a pgraft run" in err[1]
    assert not (run_dir / "report.html").exists()


# Strings a run's data may hold that would be markup, and run, if the page inserted them as HTML.
HOSTILE_PROMPT = "<script>document.title='pwned'</script><b>x</b>"
HOSTILE_TABLE = "<img src=x onerror=document.title=1>"
HOSTILE_SELECTION = "<svg onload=document.title=2>"
HOSTILE_REWARD = "<iframe srcdoc=3>"
HOSTILE_METHOD = "<object data=4>"
HOSTILE_VARIANT = "<embed src=5>"


class Dom(HTMLParser):
    """The tags, attribute names, <title> and text of a page as the browser built it."""

    def __init__(self, page: str):
        super().__init__()
        self.tags, self.attributes, self.title, self.text, self._in_title = set(), set(), "", "", False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes |= {name for name, _ in attrs}
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        self.text += data
        if self._in_title:
            self.title += data


def rewrite_eval_prompts(run_dir: Path, prompt: str, scratch: Path) -> None:
    """Every evaluation sample of the run now records `prompt` as its prompt (shards rewritten and
    recommitted): the text the sample grid shows."""
    import dataclasses

    from pgraft.shards import commit_shard, list_committed, read_shard, write_shard

    for variant in sorted(p.parent.parent for p in run_dir.glob("round-*/eval/*/round-000/generate")):
        storage = open_storage(str(variant))
        for shard_id, record in list_committed(storage, 0).items():
            samples = read_shard(storage, 0, shard_id, record)
            for sample in samples:
                sample.meta = dataclasses.replace(sample.meta, prompt=prompt)
            tar = scratch / f"shard-{shard_id}.tar"
            commit_shard(storage, tar, write_shard(samples, tar, 0), 0, shard_id)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.browser
def test_strings_from_the_run_are_shown_as_text_and_never_run(two_round_run, tmp_path):
    """A prompt, a reward table, a selection, a config value and summary fields that hold markup
    are text on the page: no script runs, no element is made from them."""
    import yaml

    from stages.filter import run_filter

    cfg, _ = two_round_run
    run_dir = shutil.copytree(cfg.run.uri, tmp_path / "run")
    shutil.copytree(run_dir / "round-000/rewards/digits_alignment", run_dir / "round-000/rewards" / HOSTILE_TABLE)
    other = cfg.model_copy(deep=True)
    other.run.uri, other.run.round, other.reward.table, other.filter.name = str(run_dir), 0, HOSTILE_TABLE, HOSTILE_SELECTION
    run_filter(other, progress=False)
    rewrite_eval_prompts(run_dir, HOSTILE_PROMPT, tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["reward"]["name"] = HOSTILE_REWARD
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    # Summaries are files in storage too: whatever they say is shown as text.
    edit_json(run_dir / "round-000/filter" / HOSTILE_SELECTION / "summary.json",
              lambda s: s.update(method=HOSTILE_METHOD))
    # A variant of its own, whose figures name a round of their own (the page keeps the round it is in).
    edit_json(run_dir / "round-001/eval/summary.json",
              lambda s: s["variants"].update({HOSTILE_VARIANT: {**s["variants"]["finetuned"], "round": HOSTILE_VARIANT}}))
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out), "--quiet"]) == 0

    dom = Dom(chromium("--dump-dom", out.as_uri(), tmp_path=tmp_path).stdout)
    assert dom.title == f"pgraft run {run_dir}"  # no script set it
    assert not dom.tags & {"script", "svg", "iframe", "b", "object", "embed"}
    assert not {name for name in dom.attributes if name.startswith("on")}
    for hostile in (HOSTILE_PROMPT, HOSTILE_TABLE, HOSTILE_SELECTION, HOSTILE_REWARD, HOSTILE_METHOD, HOSTILE_VARIANT):
        assert hostile in dom.text, hostile


def test_threshold_sweep_is_the_empirical_tail():
    rewards = np.array([0.1, 0.2, 0.2, 0.5, 0.9])
    taus, acceptance, kl = threshold_sweep(rewards, points=5)
    assert taus[0] == 0.1 and acceptance[0] == 1.0 and kl[0] == 0.0
    assert acceptance[-1] == pytest.approx(1 / 5) and kl[-1] == pytest.approx(np.log(5))
    assert np.all(np.diff(acceptance) <= 0)
