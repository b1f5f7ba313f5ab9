"""The filter stage against DuckDB doing the same work, and the filter's scaling, one run.

    python benchmarks/filter_topk.py [--rows 10000000] [--per-prompt 1000] [--k 8]
    python benchmarks/filter_topk.py --scaling 1000000,10000000,40000000 [--out benchmarks/results/filter.md]

Writes `--rows` reward rows (docs/DESIGN.md §2 columns, ~2 % duplicate sample hashes within a
prompt) as Parquet parts of a run. Then times whole processes (interpreter start included),
each one's peak RSS read from the kernel (wait4), best of `--repeats`:
  * pgraft: `pgraft filter` with method=top_k, k=K, dedup=true: reads the parts, dedups
    within each prompt, keeps the K best per prompt, writes the accepted part and summary.json;
  * duckdb: one SQL statement doing the same: dedup within (prompt_id, sample_hash) keeping the
    best reward (ties by sample_idx), top-K per prompt (row_number, ties by sample_idx), the
    copy count and the prompt size (the inputs of the reshaped reward), written as zstd
    Parquet sorted by (prompt_id, rank).
Both outputs must hold the same (prompt_id, sample_idx, rank) rows, or the script fails.

`--scaling` times the local engine and the Ray engine (a driver process against a two-node
loopback Ray cluster whose worker node has all CPUs) at each size, with the driver's peak RSS:
the Ray engine's driver never holds rows, so its memory should not grow with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pgraft import contract  # noqa: E402
from pgraft.storage import LocalStorage  # noqa: E402
from pgraft.tables import arrow_schema, commit_reward_part  # noqa: E402


def write_table(run: Path, rows: int, per_prompt: int, part_rows: int = 100_000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    store = LocalStorage(str(run))
    for part, lo in enumerate(range(0, rows, part_rows)):
        idx = np.arange(lo, min(lo + part_rows, rows))
        prompt, sample = idx // per_prompt, idx % per_prompt
        # ~2 % of samples repeat the image (hash) of an earlier sample of the same prompt.
        earlier = 1 + rng.integers(0, per_prompt, len(idx)) % np.maximum(sample, 1)
        dup = (rng.random(len(idx)) < 0.02) & (sample > 0)
        hash_src = np.where(dup, idx - earlier, idx)
        p_str, s_str = pa.array(prompt).cast(pa.string()), pa.array(sample).cast(pa.string())
        keys = pc.binary_join_element_wise("p", pc.utf8_lpad(p_str, 6, "0"), "_s", pc.utf8_lpad(s_str, 5, "0"), "")
        table = pa.table({
            "key": keys, "shard": pa.array([f"shard-{part:06d}.tar"] * len(idx)), "round": np.zeros(len(idx), np.int32),
            "prompt_id": prompt, "prompt": pc.binary_join_element_wise("prompt ", p_str, ""), "sample_idx": sample,
            "seed": rng.integers(0, 2**62, len(idx)), "reward": rng.random(len(idx)).round(6),
            "reward_name": pa.array(["synthetic"] * len(idx)),
            "sample_hash": pc.utf8_lpad(pa.array(hash_src).cast(pa.string()), 16, "0"),  # fixed width, like dHash
        }, schema=arrow_schema(contract.REWARD_COLUMNS))
        commit_reward_part(store, contract.reward_part_key(0, "synthetic", part), table)


DUCKDB_SAME_WORK = """
import duckdb
duckdb.sql('''
COPY (
  WITH copies AS (
    SELECT key, shard, prompt_id, sample_idx, reward,
           count(*) OVER twins AS copies,
           row_number() OVER (twins ORDER BY reward DESC, sample_idx) AS copy_rank
    FROM read_parquet('{glob}')
    WINDOW twins AS (PARTITION BY prompt_id, sample_hash)
  ), ranked AS (
    SELECT *, count(*) OVER (PARTITION BY prompt_id) AS prompt_size,
           row_number() OVER (PARTITION BY prompt_id ORDER BY reward DESC, sample_idx) - 1 AS rank_in_prompt
    FROM copies WHERE copy_rank = 1
  )
  SELECT key, shard, prompt_id, sample_idx, reward, copies, prompt_size, rank_in_prompt
  FROM ranked WHERE rank_in_prompt < {k} ORDER BY prompt_id, rank_in_prompt
) TO '{out}' (FORMAT parquet, COMPRESSION zstd)''')
"""


# A child's peak RSS counts the pages it shared with its parent before exec, and this process
# holds tens of GB after writing a big table; so each measured command is started by a fresh,
# small interpreter that reports the command's own wall time and peak RSS.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start,
                  "peak_mb": usage.ru_maxrss / 1024}))
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process running `cmd`."""
    # stderr goes to a file, not a pipe: a pipe nobody reads until the end fills up, and a Ray
    # driver then holds the worker log lines it cannot print (memory the engine never used).
    with tempfile.TemporaryFile() as log:
        out = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=log, text=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        if got["code"] != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd[:4])} … failed:\n{log.read().decode()[-3000:]}")
    return got["seconds"], got["peak_mb"]


def best(cmd: list[str], repeats: int, env: dict | None = None) -> tuple[float, float]:
    runs = [timed(cmd, env) for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def filter_cmd(run: Path, k: int, engine: str = "local") -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "filter", "--quiet", "--force", "--set", f"run.uri={run}",
            "--set", "reward.name=synthetic", "--set", "filter.name=topk", "--set", "filter.method=top_k",
            "--set", f"filter.k={k}", "--set", "filter.dedup=true", "--set", f"filter.engine={engine}"]


def accepted_rows(run: Path) -> set:
    from pgraft.storage import open_storage
    from stages.filter import read_accepted

    table = read_accepted(open_storage(str(run)), 0, "topk")
    return set(zip(*(table[c].to_pylist() for c in ("prompt_id", "sample_idx", "rank_in_prompt"))))


def same_work(args, tmp: Path) -> None:
    run = tmp / "run"
    t = time.perf_counter()
    write_table(run, args.rows, args.per_prompt)
    print(f"wrote {args.rows:,} rows in {time.perf_counter() - t:.1f} s")
    ours = best(filter_cmd(run, args.k), args.repeats)
    out = tmp / "duckdb.parquet"
    code = DUCKDB_SAME_WORK.format(glob=run / contract.rewards_prefix(0, "synthetic") / "*.parquet", k=args.k, out=out)
    duck = best([sys.executable, "-c", code], args.repeats)
    theirs = set(zip(*(pq.read_table(out)[c].to_pylist() for c in ("prompt_id", "sample_idx", "rank_in_prompt"))))
    mine = accepted_rows(run)
    if mine != theirs:
        raise SystemExit(f"accepted rows differ: {len(mine - theirs)} only in pgraft, {len(theirs - mine)} only in duckdb")
    print(f"same work: dedup within prompt, top-{args.k} per prompt, accepted rows written as Parquet "
          f"({len(mine):,} rows, identical in both); whole processes, best of {args.repeats}")
    print(f"  pgraft filter : {ours[0]:6.2f} s  peak {ours[1]:6.0f} MB")
    print(f"  duckdb        : {duck[0]:6.2f} s  peak {duck[1]:6.0f} MB")
    print(f"  speed ÷ duckdb: {duck[0] / ours[0]:.2f}×   peak memory ÷ duckdb: {ours[1] / duck[1]:.2f}×")


def scaling(args, tmp: Path) -> None:
    from cluster import loopback

    sizes = [int(float(s)) for s in args.scaling.split(",")]
    lines = ["| rows | local engine | local peak RSS | Ray engine | Ray driver peak RSS |", "|---|---|---|---|---|"]
    results = []
    with loopback.running(num_cpus=os.cpu_count()) as rig:
        env = rig.client_env()
        for rows in sizes:
            run = tmp / f"run-{rows}"
            write_table(run, rows, args.per_prompt)
            local = best(filter_cmd(run, args.k), args.repeats)
            local_rows = accepted_rows(run)
            ray = best(filter_cmd(run, args.k, "ray"), args.repeats, env)
            if accepted_rows(run) != local_rows:
                raise SystemExit(f"{rows:,} rows: the Ray engine accepted other rows than the local engine")
            results.append({"rows": rows, "local_s": local[0], "local_peak_mb": local[1], "ray_s": ray[0],
                            "ray_driver_peak_mb": ray[1], "accepted": len(local_rows)})
            line = (f"| {rows:,} | {local[0]:.1f} s | {local[1]:,.0f} MB | {ray[0]:.1f} s | {ray[1]:,.0f} MB |")
            lines.append(line)
            print(line, flush=True)
            shutil.rmtree(run)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(
            f"Filter scaling: top-{args.k} + dedup, {args.per_prompt} samples per prompt, whole `pgraft filter` "
            f"processes, best of {args.repeats}; Ray = two-node loopback cluster, worker node with {os.cpu_count()} CPUs; "
            "both engines accepted the same rows at every size.\n\n" + text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--per-prompt", type=int, default=1000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scaling", help="comma-separated table sizes: time both engines at each")
    parser.add_argument("--out", help="with --scaling: write the table here (and the figures as .json beside it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.scaling:
            scaling(args, Path(tmp))
        else:
            same_work(args, Path(tmp))


if __name__ == "__main__":
    main()
