"""`pgraft report RUN`: one self-contained HTML page of a run (plots and samples embedded as
data: URIs, so it opens offline), for local and s3:// runs alike.

Per round: samples, stage wall times, reward histograms (all vs accepted per selection), the
selections table and the GRS trade-off curve (acceptance and implied KL against the
threshold, and KL against acceptance for threshold / best-of-N / top-K, with the round's
selections marked). Across rounds: evaluation (mean reward ± s.e., Fréchet distance,
diversity) as a table and a line plot. Sample grids: per prompt, the base and each round's
fine-tuned sampler on the same evaluation seeds.

Every number shown in a table carries `data-figure="<path>"`, the place in the run's summaries
it comes from, so a test (or a reader) can check the page against storage.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgraft import contract, grs
from pgraft.errors import PgraftError
from pgraft.runs import COMPLETE, RoundState, RunState, read_run
from pgraft.storage import Storage, open_storage
from pgraft.tables import list_reward_parts, read_accepted_table, read_reward_table

GRID_SAMPLES = 8  # samples per prompt and variant in the sample grids (sample_idx 0..7: the same seeds)
THUMBNAIL_PX = 64  # larger images are shrunk to this height in the grids


class ReportError(PgraftError):
    """The run cannot be reported (not a run, no finished round)."""


# Figures -----------------------------------------------------------------------------------

def threshold_sweep(rewards: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(τ, acceptance P(r ≥ τ), implied KL −log P(r ≥ τ)) over the reward table's range."""
    r = np.sort(np.asarray(rewards, dtype=np.float64))
    taus = np.quantile(r, np.linspace(0.0, 1.0, points))
    acceptance = 1.0 - np.searchsorted(r, taus, side="left") / len(r)
    return taus, acceptance, -np.log(acceptance)


@functools.lru_cache(maxsize=8)
def family_curves(group_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(acceptance, KL) of best-of-N (N = 1..M) and top-K of M (K = 1..M), M = `group_size`."""
    ns = np.arange(1, group_size + 1)
    ks = np.arange(1, group_size + 1)
    return {
        "best-of-N": (1.0 / ns, np.array([grs.best_of_n_kl(int(n)) for n in ns])),
        f"top-K of {group_size}": (ks / group_size, np.array([grs.top_k_kl(int(k), group_size) for k in ks])),
    }


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    return plt


def histogram_figure(rewards: np.ndarray, accepted: dict[str, np.ndarray]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    bins = np.histogram_bin_edges(rewards, bins=40)
    ax.hist(rewards, bins=bins, color="#bbbbbb", label=f"all samples ({len(rewards)})")
    for name, values in accepted.items():
        ax.hist(values, bins=bins, histtype="step", linewidth=1.8, label=f"{name} ({len(values)})")
    ax.set_xlabel("reward")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    return _png(fig)


def tradeoff_figure(rewards: np.ndarray, group_size: int, selections: list[dict]) -> str:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    taus, acceptance, kl = threshold_sweep(rewards)
    left.plot(taus, acceptance, color="C0")
    left.set_xlabel("threshold τ")
    left.set_ylabel("acceptance P(r ≥ τ)", color="C0")
    twin = left.twinx()
    twin.plot(taus, kl, color="C3")
    twin.set_ylabel("implied KL (nats)", color="C3")
    right.plot(acceptance, kl, color="C0", label="threshold: −log a")
    for (label, (a, k)), color in zip(family_curves(group_size).items(), ("C1", "C2")):
        right.plot(a, k, "o-", markersize=3, color=color, label=label)
    r = np.sort(rewards)
    for i, s in enumerate(selections):
        # The threshold that accepts the same fraction: where each selection sits on the τ axis.
        tau = s["parameters"].get("threshold", float(np.quantile(r, 1.0 - s["acceptance_rate"])))
        marker = dict(marker="*", markersize=13, color=f"C{4 + i % 5}", linestyle="none")
        left.plot([tau], [s["acceptance_rate"]], **marker)
        right.plot([s["acceptance_rate"]], [s["kl"]], label=s["name"], **marker)
    right.set_xscale("log")
    right.set_xlabel("acceptance rate")
    right.set_ylabel("implied KL (nats)")
    right.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def evaluation_figure(rows: list[dict]) -> str:
    plt = _pyplot()
    fig, (reward_ax, fd_ax, div_ax) = plt.subplots(1, 3, figsize=(12, 3.2))
    for variant, color in (("base", "#888888"), ("finetuned", "C0")):
        pts = [r for r in rows if r["variant"] == variant]
        x = [r["round"] for r in pts]
        reward_ax.errorbar(x, [r["reward_mean"] for r in pts], yerr=[r["reward_stderr"] for r in pts], marker="o",
                           color=color, label=variant, capsize=3)
        if all(r["frechet_distance"] is not None for r in pts):
            fd_ax.plot(x, [r["frechet_distance"] for r in pts], "o-", color=color, label=variant)
        div_ax.plot(x, [r["diversity"] for r in pts], "o-", color=color, label=variant)
    for ax, title in ((reward_ax, "mean reward ± s.e."), (fd_ax, "Fréchet distance"), (div_ax, "within-prompt diversity")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. a task with no real data to compare with has no Fréchet distance
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#888888")
    fig.tight_layout()
    return _png(fig)


def _thumbnail_strip(images: list[np.ndarray]) -> str:
    """One PNG (data: URI) of images side by side, each shrunk to THUMBNAIL_PX high if larger."""
    from PIL import Image

    tiles = []
    for image in images:
        tile = Image.fromarray(image)
        if tile.height > THUMBNAIL_PX:
            tile = tile.resize((max(1, tile.width * THUMBNAIL_PX // tile.height), THUMBNAIL_PX))
        tiles.append(tile.convert("RGB"))
    gap = 1
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# Reading the run ---------------------------------------------------------------------------

@dataclass
class TableData:
    rewards: np.ndarray  # finite rewards of every sample in the table
    group_size: int  # the most common samples-per-prompt (M of the top-K curve)
    accepted: dict[str, np.ndarray]  # selection name → accepted rewards, for the selections made from this table
    selections: list[dict]  # their summaries


@dataclass
class RoundData:
    state: RoundState
    samples: int
    tables: dict[str, TableData]  # every complete reward table that a selection used (or the first one)


def read_table(storage: Storage, rnd: int, table_name: str, selections: list[dict]) -> TableData:
    parts = list_reward_parts(storage, rnd, table_name)
    table = read_reward_table(storage, [parts[k] for k in sorted(parts)], columns=["prompt_id", "reward"]).table
    rewards = table["reward"].to_numpy(zero_copy_only=False)
    counts = np.bincount(np.unique(table["prompt_id"].to_numpy(), return_inverse=True)[1])
    accepted = {s["name"]: read_accepted_table(storage, rnd, s["name"], s)["reward"].to_numpy()
                for s in selections}
    return TableData(rewards[np.isfinite(rewards)], int(np.bincount(counts).argmax()), accepted, selections)


def read_round(storage: Storage, state: RoundState) -> RoundData:
    tables = state.done("reward")
    selections = [s.summary for s in state.done("filter").values() if s.summary["reward_table"] in tables]
    used = sorted({s["reward_table"] for s in selections}) or sorted(tables)[:1]
    generate = state.of("generate")[0].summary or {}
    return RoundData(state, int(generate.get("samples", 0)),
                     {name: read_table(storage, state.round, name, [s for s in selections if s["reward_table"] == name])
                      for name in used})


def eval_samples(storage: Storage, round_idx: int, variant: str, per_prompt: int) -> tuple[dict[int, list], dict[int, str]]:
    """The first `per_prompt` decoded samples (sample_idx order) of each prompt of an evaluation
    variant, and each prompt's text as the samples record it."""
    from pgraft.shards import DECODED, list_committed, read_shard

    variant_storage = open_storage(storage.url(contract.eval_prefix(round_idx, variant)))
    wanted: dict[int, dict[int, np.ndarray]] = {}
    texts: dict[int, str] = {}
    for sid, record in sorted(list_committed(variant_storage, 0).items()):
        if not any(contract.parse_sample_key(k)[1] < per_prompt for k in record.keys):
            continue
        for sample in read_shard(variant_storage, 0, sid, record, wanted=DECODED):
            if sample.meta.sample_idx < per_prompt and sample.decoded is not None:
                wanted.setdefault(sample.meta.prompt_id, {})[sample.meta.sample_idx] = sample.decoded
                texts[sample.meta.prompt_id] = sample.meta.prompt
    return {p: [imgs[i] for i in sorted(imgs)] for p, imgs in sorted(wanted.items())}, texts


# HTML --------------------------------------------------------------------------------------

def _text(value) -> str:
    """Any value read from the run (names, prompts, keys, methods) as HTML text: never markup."""
    return html.escape(str(value))


def _fmt(value, places: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{places}f}" if isinstance(value, float) else str(value)


def _cell(value, figure: str | None = None, places: int = 4) -> str:
    attr = f' data-figure="{html.escape(figure)}"' if figure else ""
    return f"<td{attr}>{html.escape(_fmt(value, places))}</td>"


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(f'<tr>{r}</tr>' for r in rows)}</table>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f2f2f2}.incomplete{background:#fff4d6;border:1px solid #e0b000;padding:6px 10px}
img.plot{max-width:100%}img.grid{image-rendering:pixelated;height:32px}.wide{overflow-x:auto}
"""


def _round_section(rd: RoundData) -> str:
    st, rnd = rd.state, rd.state.round
    out = [f'<h2 id="round-{rnd}">Round {rnd}</h2>']
    if not st.complete:
        missing = ", ".join(f"{s.stage} ({s.state})" for s in st.stages if s.state != COMPLETE)
        out.append(f'<p class="incomplete" data-round-state="incomplete">Round {rnd} is not finished: {html.escape(missing)}. '
                   "It is shown as far as it goes; rerun the stages named (they resume).</p>")
    stage_seconds = (st.pipeline or {}).get("stages", {})
    rows = []
    for s in st.stages:
        if s.stage in stage_seconds and len(st.of(s.stage)) == 1:  # the round pipeline's wall time of the stage
            seconds = _cell(stage_seconds[s.stage]["seconds"], f"round{rnd}.pipeline.{s.stage}.seconds", 1)
        else:  # a stage run by hand: its own summary's time, where it records one
            seconds = _cell((s.summary or {}).get("seconds"), f"round{rnd}.{s.stage}.{s.name}.seconds" if s.summary
                            and "seconds" in s.summary else None, 1)
        rows.append(f"<td>{html.escape(s.stage)}</td><td>{html.escape(s.name or '-')}</td><td>{_text(s.state)}</td>"
                    f"{seconds}<td>{html.escape(s.detail)}</td>")
    out.append(f"<p>Samples planned: <span data-figure='round{rnd}.generate.samples'>{rd.samples}</span></p>")
    out.append(_table(["stage", "name", "state", "wall time (s)", "what exists"], rows))
    selections = [s.summary for s in st.of("filter") if s.state == COMPLETE]
    if selections:
        rows = []
        for s in selections:
            fig = f"round{rnd}.filter.{s['name']}"
            params = ", ".join(f"{k}={v}" for k, v in s["parameters"].items())
            rows.append(f"<td>{_text(s['name'])}</td><td>{_text(s['method'])}</td><td>{html.escape(params)}</td>"
                        + _cell(s["rows_considered"], f"{fig}.rows_considered") + _cell(s["rows_accepted"], f"{fig}.rows_accepted")
                        + _cell(s["acceptance_rate"], f"{fig}.acceptance_rate") + _cell(s["kl"], f"{fig}.kl")
                        + _cell(s["kl_empirical"], f"{fig}.kl_empirical"))
        out.append("<h3>Selections</h3>" + _table(
            ["selection", "method", "parameters", "considered", "accepted", "acceptance", "implied KL (nats)",
             "plug-in KL"], rows))
    for name, td in rd.tables.items():
        if not len(td.rewards):
            continue
        out.append(f"<h3>Rewards ({html.escape(name)})</h3>")
        out.append(f'<img class="plot" alt="reward histogram round {rnd} {html.escape(name)}" '
                   f'src="{histogram_figure(td.rewards, td.accepted)}">')
        out.append(f"<h3>GRS trade-off ({html.escape(name)})</h3><p>Left: acceptance and implied KL of a threshold on "
                   "this table's rewards; right: KL against acceptance for each rule (best-of-N and top-K in closed "
                   f"form, M = {td.group_size} samples per prompt). Stars: the selections made from this table.</p>")
        out.append(f'<img class="plot" alt="GRS trade-off round {rnd} {html.escape(name)}" '
                   f'src="{tradeoff_figure(td.rewards, td.group_size, td.selections)}">')
    return "\n".join(out)


def _evaluation_section(run: RunState) -> tuple[str, list[dict]]:
    rows = []
    for st in run.rounds:
        for s in st.of("evaluate"):
            if s.state == COMPLETE:
                for variant, v in s.summary["variants"].items():
                    rows.append({**v, "round": st.round, "variant": variant})  # where it sits, whatever its keys say
    if not rows:
        return "<h2>Evaluation</h2><p>No round has been evaluated (train.eval_samples_per_prompt = 0?).</p>", rows
    cells = []
    for r in rows:
        fig = f"round{r['round']}.eval.{r['variant']}"
        cells.append(f"<td>{_text(r['round'])}</td><td>{_text(r['variant'])}</td>" + _cell(r["samples"], f"{fig}.samples")
                     + _cell(r["reward_mean"], f"{fig}.reward_mean") + _cell(r["reward_stderr"], f"{fig}.reward_stderr")
                     + _cell(r["frechet_distance"], f"{fig}.frechet_distance") + _cell(r["diversity"], f"{fig}.diversity"))
    body = _table(["round", "variant", "samples", "mean reward", "s.e.", "Fréchet distance", "diversity"], cells)
    # The task's own figures (TaskSpec.metrics: validity, novelty, … for molecules), one column each.
    names = list(dict.fromkeys(name for r in rows for name in r.get("task_metrics", {})))
    if names:
        cells = [f"<td>{_text(r['round'])}</td><td>{_text(r['variant'])}</td>"
                 + "".join(_cell(r.get("task_metrics", {}).get(name), f"round{r['round']}.eval.{r['variant']}.task_metrics.{name}")
                           for name in names) for r in rows]
        body += "<h3>The task's metrics</h3>" + _table(["round", "variant"] + [n.replace("_", " ") for n in names], cells)
    return ("<h2>Evaluation across rounds</h2><p>Fresh seeds, the same every round; base = the run's base sampler.</p>"
            + body + f'<img class="plot" alt="evaluation across rounds" src="{evaluation_figure(rows)}">'), rows


def _task_show(config: dict):
    """How the run's task shows a decoded sample as an image (TaskSpec.show); as it is without a
    task, or for a plug-in task this process cannot import."""
    from pgraft.errors import ConfigError
    from pgraft.tasks import get_task

    name = (config.get("task") or {}).get("name")
    try:
        return get_task(name).show if name else (lambda sample: sample)
    except ConfigError:
        return lambda sample: sample


def _grid_section(storage: Storage, run: RunState, eval_rows: list[dict]) -> str:
    rounds = sorted({r["round"] for r in eval_rows})
    if not rounds:
        return ""
    # The base's samples lie where it was evaluated: later rounds reuse that evaluation (stages/evaluate.py).
    first_base = next((r for r in eval_rows if r["round"] == rounds[0] and r["variant"] == "base"), {})
    columns = ([("base", first_base.get("reused_from_round", rounds[0]), "base")]
               + [(f"round {r} fine-tuned", r, "finetuned") for r in rounds])
    show = _task_show(run.config)
    images, texts = {}, {}
    for label, rnd, variant in columns:
        shown, prompt_texts = eval_samples(storage, rnd, variant, GRID_SAMPLES)
        images[label] = {p: [show(sample) for sample in samples] for p, samples in shown.items()}
        texts.update(prompt_texts)
    prompt_ids = sorted({p for imgs in images.values() for p in imgs})
    rows = []
    for p in prompt_ids:
        name = texts.get(p, f"prompt {p}")  # the text the samples were made from (a prompts file's line)
        cells = "".join(f'<td><img class="grid" alt="{html.escape(label)}" src="{_thumbnail_strip(images[label][p])}"></td>'
                        if images[label].get(p) else "<td>n/a</td>" for label, _, _ in columns)
        rows.append(f"<td>{html.escape(name)}</td>{cells}")
    return (f"<h2>Samples</h2><p>The first {GRID_SAMPLES} evaluation seeds of each prompt, the same seeds in every column.</p>"
            + '<div class="wide">' + _table(["prompt"] + [c[0] for c in columns], rows) + "</div>")


def render_report(uri: str, progress: bool = False) -> str:
    """The report page of the run at `uri` as an HTML string."""
    run = read_run(uri)
    if not any(st.complete for st in run.rounds):
        where = "; ".join(f"round {st.round}: " + ", ".join(f"{s.stage} {s.state}" for s in st.stages if s.state != COMPLETE)
                          for st in run.rounds) or "no round started"
        raise ReportError(f"{run.uri} has no finished round yet ({where}); `pgraft status {run.uri}` shows what to rerun")
    storage = open_storage(uri)
    sections = []
    for st in run.rounds:
        if progress:
            print(f"report: reading round {st.round}")
        sections.append(_round_section(read_round(storage, st)))
    evaluation, eval_rows = _evaluation_section(run)
    grid = _grid_section(storage, run, eval_rows)
    done = sum(st.complete for st in run.rounds)
    title = f"pgraft run {run.uri}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p><span data-figure='rounds.complete'>{done}</span> of {len(run.rounds)} round(s) complete; "
            f"model {html.escape(str(run.config.get('model', {}).get('path') or run.config.get('task', {}).get('dir')))}; "
            f"reward {html.escape(str(run.config.get('reward', {}).get('name')))}.</p>"
            + evaluation + grid + "\n".join(sections) + "</body></html>")


def default_report_path(uri: str) -> str:
    storage = open_storage(uri)
    local = storage.local_path("report.html")
    return local if local else f"{Path(storage.uri.rstrip('/')).name or 'run'}-report.html"


def write_report(uri: str, out: str | None = None, progress: bool = False) -> str:
    page = render_report(uri, progress)
    path = Path(out or default_report_path(uri))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return str(path)
