"""Top-K + dedup over synthetic reward tables: the filter stage against DuckDB, same files, one run.

    python benchmarks/filter_topk.py [--rows 10000000] [--per-prompt 1000] [--k 8]

Writes `--rows` reward rows (docs/DESIGN.md §2 columns, ~2 % duplicate sample hashes within a
prompt) as Parquet parts of a run, then times, each in a fresh subprocess that also reports
its peak RSS:
  * pgraft: `run_filter` with method=top_k, k=K, dedup=true (reads the parts, dedups, selects,
    writes accepted.parquet and summary.json);
  * duckdb: `SELECT * FROM parts QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY
    reward DESC) <= K`, materialised as Arrow (no dedup, no output file: less work than ours).
Then the wall time of the `pgraft filter` command on a 1 M-row table (process start included).
"""

from __future__ import annotations

import argparse
import json
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
from pgraft.tables import arrow_schema  # noqa: E402


def write_table(run: Path, rows: int, per_prompt: int, part_rows: int = 100_000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    prefix = run / contract.rewards_prefix(0, "synthetic")
    prefix.mkdir(parents=True, exist_ok=True)
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
        pq.write_table(table, prefix / f"part-{part:06d}.parquet", compression="zstd")


OURS = """
import json, resource, sys, time
from pgraft.config import load_config
from stages.filter import run_filter
cfg = load_config(None, ["run.uri={run}", "reward.name=synthetic", "filter.name=topk", "filter.method=top_k",
                         "filter.k={k}", "filter.dedup=true"])
t = time.perf_counter(); s = run_filter(cfg, progress=False, force=True); wall = time.perf_counter() - t
print(json.dumps({{"seconds": wall, "rows": s.rows_accepted, "considered": s.rows_considered,
                   "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

DUCK = """
import json, resource, time, duckdb
con = duckdb.connect()
t = time.perf_counter()
out = con.sql("SELECT * FROM '{glob}' QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY reward DESC) <= {k}").to_arrow_table()
wall = time.perf_counter() - t
print(json.dumps({{"seconds": wall, "rows": out.num_rows, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--per-prompt", type=int, default=1000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t = time.perf_counter()
        write_table(run, args.rows, args.per_prompt)
        print(f"wrote {args.rows:,} rows in {time.perf_counter() - t:.1f} s")
        glob = run / contract.rewards_prefix(0, "synthetic") / "*.parquet"
        ours = [child(OURS.format(run=run, k=args.k)) for _ in range(args.repeats)]
        duck = [child(DUCK.format(glob=glob, k=args.k)) for _ in range(args.repeats)]
        best_ours = min(r["seconds"] for r in ours)
        best_duck = min(r["seconds"] for r in duck)
        print(f"pgraft top-{args.k} + dedup : {best_ours:6.2f} s  peak {max(r['peak_mb'] for r in ours):7.0f} MB  "
              f"({ours[0]['rows']:,} accepted of {ours[0]['considered']:,} after dedup)")
        print(f"duckdb QUALIFY top-{args.k}  : {best_duck:6.2f} s  peak {max(r['peak_mb'] for r in duck):7.0f} MB  "
              f"({duck[0]['rows']:,} rows, no dedup)")
        print(f"speed ratio duckdb/pgraft : {best_duck / best_ours:.2f} (≥ 1 means pgraft is as fast or faster)")

        small = Path(tmp) / "small"
        write_table(small, 1_000_000, args.per_prompt)
        cmd = [sys.executable, "-m", "pgraft.cli", "filter", "--quiet", "--set", f"run.uri={small}",
               "--set", "reward.name=synthetic", "--set", "filter.name=thr", "--set", "filter.method=threshold",
               "--set", "filter.threshold=0.9"]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        print(f"`pgraft filter` on 1,000,000 rows (threshold, process start included): {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
