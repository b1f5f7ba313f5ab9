"""Byte-identity check for refactors: run the pipeline on two versions of the code, compare.

A refactor must leave every result byte-identical: shards, reward tables, accepted rows,
trained weights, inversions, correctors. This script runs a small but complete workload on one
checkout and writes a manifest of sha256 digests; `compare` then diffs two manifests.

    python benchmarks/identity_check.py run --repo REPO --out DIR [--python PY] [--models DIR0]
    python benchmarks/identity_check.py manifest --out DIR        # rewrite DIR/manifest.json only
    python benchmarks/identity_check.py compare A/manifest.json B/manifest.json

`run` executes, with REPO as working directory and REPO first on PYTHONPATH (so that an
editable install pointing elsewhere does not shadow the code under test):
  1. `pgraft pretrain digits` into DIR/models/digits, unless present (or copied from --models);
  2. round 0 of configs/digits.yaml (generate, reward, filter, train, evaluate) into DIR/run;
  3. `pgraft invert` and `pgraft train-corrector` of configs/digits-inc.yaml, kept small, into DIR/inc.
Samples, commit records and run configs record absolute model and run locations, so every
run reaches DIR through the same symlink, STAGE: two runs into different DIRs record the
same paths. (Runs therefore cannot overlap; a lock file refuses a second one.)

Files holding wall times, Ray node ids or random tokens are "volatile": hashed, listed, never
compared (VOLATILE below). Accepted-row parts have a random token in their names and are
compared by content instead; the figures (rewards, Fréchet distance, KL, losses) are shown side
by side. `compare` exits 1 when any non-volatile file differs or is missing, or a figure differs.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGE = Path("/tmp/pgraft-identity-stage")  # the one path every run's outputs are recorded under
INC_SMALL = ["--set", "invert.limit=512", "--set", "corrector.steps=100"]  # ~1 min on 2 cores
GROUPS = ("shards", "reward tables", "accepted rows", "trained weights", "inversion", "corrector", "models", "other")
VOLATILE = (
    "*summary.json",           # wall times, throughput, Ray node ids (their figures are compared below)
    "*pipeline.json",          # the round pipeline's wall times and Ray nodes per stage
    "*/filter/*/accepted/*",   # part names carry a random token: compared by content (".../accepted#rows")
    "*/eval/*/model.json",     # the evaluated model's digest hashes its files' mtimes (pgraft.models.fetch.model_digest)
)


def is_volatile(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in VOLATILE)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def group_of(rel: str) -> str:
    rules = (("models/*", "models"), ("inc/inversion/*", "inversion"), ("inc/corrector/*", "corrector"),
             ("*/filter/*/accepted*", "accepted rows"), ("*/rewards/*", "reward tables"),
             ("*/train/*/model/*", "trained weights"), ("*/generate/*", "shards"))
    return next((group for pattern, group in rules if fnmatch.fnmatch(rel, pattern)), "other")


def rows_digest(folder: Path) -> str:
    """sha256 of a Parquet folder's rows, sorted by key: independent of part names and order."""
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(str(p) for p in folder.glob("*.parquet")))
    table = table.sort_by("key")
    digest = hashlib.sha256(str(table.schema).encode())
    for row in table.to_pylist():
        digest.update(json.dumps(row, sort_keys=True, default=repr).encode() + b"\n")
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def pick(summary: dict, *keys: str) -> dict:
    return {k: summary[k] for k in keys if k in summary}


def figures(out: Path) -> dict:
    round0, inc = out / "run" / "round-000", out / "inc"
    variants = read_json(round0 / "eval" / "summary.json").get("variants", {})
    found = {f"eval/{variant}": pick(s, "samples", "reward_mean", "reward_stderr", "frechet_distance", "diversity")
             for variant, s in variants.items()}
    for kind, folder, keys in (
            ("filter", round0 / "filter", ("rows_considered", "rows_accepted", "acceptance_rate", "kl", "kl_empirical")),
            ("train", round0 / "train", ("steps", "samples", "final_loss", "fingerprint")),
            ("inversion", inc / "inversion", ("samples", "converged", "reconstruction_error_mean",
                                              "reconstruction_error_max", "iterations_mean", "noise_rms")),
            ("corrector", inc / "corrector", ("samples", "left_out", "steps", "final_loss", "fingerprint"))):
        for summary in sorted(folder.glob("*/summary.json")):
            found[f"{kind}/{summary.parent.name}"] = pick(read_json(summary), *keys)
    return found


def write_manifest(out: Path) -> dict:
    files = {}
    for top in ("run", "inc", "models/digits"):
        for path in sorted((out / top).rglob("*")):
            if path.is_file() and not path.name.endswith(".tmp"):
                rel = path.relative_to(out).as_posix()
                files[rel] = {"sha256": sha256(path), "group": group_of(rel),
                              "volatile": is_volatile(rel)}
        for accepted in sorted((out / top).glob("**/filter/*/accepted")):
            rel = accepted.relative_to(out).as_posix() + "#rows"
            files[rel] = {"sha256": rows_digest(accepted), "group": "accepted rows", "volatile": False}
    manifest = {**read_json(out / "manifest.json"), "files": files, "figures": figures(out)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def run(args: argparse.Namespace) -> int:
    repo, out = args.repo.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models" / "digits"
    if args.models and not (models / "summary.json").exists():
        shutil.copytree(args.models.resolve(), models, dirs_exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a local Ray, never a cluster's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    # The CLI moved from the library (pgraft.cli) to the entry points (pipelines.cli) in issue H;
    # the script runs either side of that change.
    cli_module = "pipelines.cli" if (repo / "pipelines" / "cli.py").exists() else "pgraft.cli"
    py, cli, s = [args.python], [args.python, "-m", cli_module], str(STAGE)
    commands = [
        ("round", py + ["pipelines/pgraft_round.py", "--config", "configs/digits.yaml", "--set", f"run.uri={s}/run",
                        "--set", f"task.dir={s}/models/digits", "--set", "task.pretrain=false", "--set", "run.rounds=1",
                        "--quiet"]),
    ] + [(stage, cli + [stage, "--config", "configs/digits-inc.yaml", "--set", f"run.uri={s}/inc", "--set",
                        f"task.dir={s}/models/digits", "--set", f"model.path={s}/models/digits/flow"] + INC_SMALL)
         for stage in ("invert", "train-corrector")]
    if not (models / "summary.json").exists():
        commands.insert(0, ("pretrain", cli + ["pretrain", "digits", "--out", f"{s}/models/digits"]))
    seconds = {}
    with open(f"{STAGE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises when another run holds the stage
        if STAGE.is_symlink():
            STAGE.unlink()
        STAGE.symlink_to(out, target_is_directory=True)
        try:
            for name, command in commands:
                print(f"[identity] {name}: {' '.join(command)}", flush=True)
                start = time.perf_counter()
                subprocess.run(command, cwd=repo, env=env, check=True)
                seconds[name] = round(time.perf_counter() - start, 1)
                print(f"[identity] {name} done in {seconds[name]} s", flush=True)
        finally:
            STAGE.unlink()
    (out / "manifest.json").write_text(json.dumps({"repo": str(repo), "commit": git_head(repo), "seconds": seconds}))
    manifest = write_manifest(out)
    print(f"[identity] {len(manifest['files'])} files -> {out / 'manifest.json'}")
    return 0


def git_head(repo: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                           text=True).stdout.strip()
    return done.stdout.strip() + (" (dirty)" if dirty else "")


def compare(args: argparse.Namespace) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    print(f"A: {args.a}  ({a.get('commit')})\nB: {args.b}  ({b.get('commit')})\n")
    counts = {g: {"identical": 0, "differ": 0, "missing": 0, "volatile": 0} for g in GROUPS}
    bad = []
    for rel in sorted(a["files"].keys() | b["files"].keys()):
        fa, fb = a["files"].get(rel), b["files"].get(rel)
        if is_volatile(rel):  # this script's list, not the manifests': a manifest stays valid when it grows
            outcome = "volatile"
        elif fa is None or fb is None:
            outcome = "missing"
        else:
            outcome = "identical" if fa["sha256"] == fb["sha256"] else "differ"
        counts[group_of(rel) if not rel.endswith("#rows") else "accepted rows"][outcome] += 1
        if outcome in ("differ", "missing"):
            bad.append(f"  {outcome:8} {rel}" + ("" if fa else "  (only in B)") + ("" if fb else "  (only in A)"))
    print(f"{'group':16}{'identical':>10}{'differ':>8}{'missing':>9}{'volatile':>10}")
    for group, c in counts.items():
        print(f"{group:16}{c['identical']:>10}{c['differ']:>8}{c['missing']:>9}{c['volatile']:>10}")
    if bad:
        print("\nnot identical:\n" + "\n".join(bad))
    print(f"\n{'figure':52}{'A':>22}{'B':>22}")
    fig_a, fig_b, figures_differ = a.get("figures", {}), b.get("figures", {}), 0
    for section in sorted(fig_a.keys() | fig_b.keys()):
        va, vb = fig_a.get(section, {}), fig_b.get(section, {})
        for key in sorted(va.keys() | vb.keys()):
            x, y = va.get(key, "-"), vb.get(key, "-")
            figures_differ += x != y
            print(f"{section + '.' + key:52}{str(x)[:20]:>22}{str(y)[:20]:>22}{'' if x == y else '   <- differs'}")
    print(f"\nseconds  A: {a.get('seconds')}\n         B: {b.get('seconds')}")
    # The figures come from volatile summaries; a difference there is a real difference too.
    failed = bool(bad or figures_differ)
    print(f"\nRESULT: {len(bad)} file(s) differ or missing, {figures_differ} figure(s) differ" if failed
          else "\nRESULT: identical (volatile files excepted), figures equal")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the workload on REPO and write DIR/manifest.json")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--models", type=Path, help="copy these pretrained digits models instead of pretraining")
    m = sub.add_parser("manifest", help="rewrite DIR/manifest.json from DIR's files")
    m.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="compare two manifests; exit 1 if a non-volatile file differs")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args()
    if args.command == "manifest":
        write_manifest(args.out.resolve())
        return 0
    return run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
