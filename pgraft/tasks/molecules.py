"""The built-in `molecules` task (docs/DESIGN.md §8): small molecules as SELFIES token
sequences, diffused in a continuous token-embedding space.

Data: RDKit's bundled NCI file `Data/NCI/first_5K.smi` (it ships inside the `rdkit` wheel),
filtered by size and alphabet (one fragment, MIN_ATOMS…MAX_ATOMS heavy atoms, at most
MAX_TOKENS SELFIES tokens, all in SELFIES' semantically robust alphabet) and split 90/10 into
train and held-out by the task seed.

Representation: a molecule is its SELFIES tokens padded with `[nop]` to MAX_TOKENS, each
token a fixed vector of EMBED_DIM (row norm √EMBED_DIM, drawn once from a fixed seed), so x_0
is (MAX_TOKENS, EMBED_DIM). Decoding takes the nearest token at every position (the first
position among atom tokens only, so a molecule has at least one atom) and reads the SELFIES
back: every decoded sample is a valid molecule (SELFIES' guarantee), which the tests check.
The denoiser is pgraft/models/sequence.py, sampled with diffusers' DDIM.

Rewards (RDKit): QED, the synthetic accessibility score (Ertl & Schuffenhausen 2009, RDKit
Contrib, shipped in the wheel) and penalised logP (logP − SA − rings larger than six atoms),
and `molecule_properties`, a weighted sum of them. Metrics: validity, uniqueness, novelty
against the train split, internal diversity (1 − mean Tanimoto of Morgan fingerprints, radius
2, 2,048 bits, over distinct pairs) and the Fréchet ChemNet Distance (the `fcd` package's
ChemNet, whose weights ship in its wheel) to the held-out split.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

MIN_ATOMS, MAX_ATOMS = 3, 20  # heavy atoms of a molecule the corpus keeps
MAX_TOKENS = 32  # SELFIES tokens per molecule (the sequence length)
EMBED_DIM = 16  # size of a token vector
EMBED_SEED = 20240601  # the fixed draw of the token vectors (part of the task, like its vocabulary)
PAD = "[nop]"  # SELFIES' no-operation token: the padding
PROMPT = "a molecule"  # the task is unconditional: one prompt (class 0) and the null class
NULL_CLASS = 1
HELD_OUT = 0.1  # share of the corpus held out (FCD reference, novelty excludes only train)


class MoleculeDataError(ValueError):
    """A SMILES file cannot be used (missing, or nothing in it parses)."""


def _quiet_rdkit():
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")


def default_smiles_file() -> Path:
    from rdkit import RDConfig

    return Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


def read_smiles_file(path: str | Path) -> tuple[list[str], int]:
    """(canonical SMILES of the lines that parse, number of lines skipped because they did not).
    A line's first whitespace-separated field is its SMILES; blank lines are ignored."""
    from rdkit import Chem

    _quiet_rdkit()
    path = Path(path)
    if not path.is_file():
        raise MoleculeDataError(f"SMILES file {path} does not exist")
    parsed, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split()
        if not fields:
            continue
        mol = Chem.MolFromSmiles(fields[0])
        if mol is None:
            skipped += 1
            continue
        parsed.append(Chem.MolToSmiles(mol))
    if skipped:
        print(f"molecules: {skipped} of {len(parsed) + skipped} lines of {path} did not parse as SMILES and were "
              "skipped", file=sys.stderr)
    if not parsed:
        raise MoleculeDataError(f"SMILES file {path}: no line parses as a molecule")
    return parsed, skipped


def size_filter(smiles: list[str]) -> list[str]:
    """The molecules the task models, in file order without repeats: one fragment, MIN_ATOMS to
    MAX_ATOMS heavy atoms, at most MAX_TOKENS SELFIES tokens, all of them in SELFIES' semantically
    robust alphabet (organic atoms at standard valences: any sequence of them decodes to a
    molecule RDKit accepts; metals and explicit-hydrogen tokens would break that guarantee)."""
    import selfies as sf
    from rdkit import Chem

    robust = sf.get_semantic_robust_alphabet()
    kept, seen = [], set()
    for smi in smiles:
        mol = Chem.MolFromSmiles(smi)
        if smi in seen or len(Chem.GetMolFrags(mol)) != 1 or not MIN_ATOMS <= mol.GetNumHeavyAtoms() <= MAX_ATOMS:
            continue
        try:
            tokens = sf.split_selfies(sf.encoder(smi))
        except sf.EncoderError:
            continue
        tokens = list(tokens)
        if len(tokens) <= MAX_TOKENS and robust.issuperset(tokens):
            seen.add(smi)
            kept.append(smi)
    return kept


@functools.lru_cache(maxsize=4)
def corpus(path: str | None = None) -> tuple[str, ...]:
    """The filtered corpus of `path` (default: RDKit's NCI first_5K.smi)."""
    smiles, _ = read_smiles_file(path or default_smiles_file())
    return tuple(size_filter(smiles))


def split_of(smiles: tuple[str, ...], split: str, seed: int) -> list[str]:
    if split not in ("all", "train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'all', 'train' or 'test'")
    if split == "all":
        return list(smiles)
    order = np.random.default_rng(seed).permutation(len(smiles))
    cut = len(smiles) - int(round(HELD_OUT * len(smiles)))
    idx = order[:cut] if split == "train" else order[cut:]
    return [smiles[i] for i in sorted(idx)]


def molecules(split: str = "all", seed: int = 0) -> list[str]:
    return split_of(corpus(), split, seed)


# Tokens ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """The SELFIES tokens of the whole corpus, `[nop]` first, the rest sorted."""
    import selfies as sf

    tokens = {t for smi in corpus() for t in sf.split_selfies(sf.encoder(smi))}
    return (PAD, *sorted(tokens - {PAD}))


@functools.lru_cache(maxsize=1)
def token_vectors():
    """(V, EMBED_DIM) float32 token vectors, each of norm √EMBED_DIM (about unit variance per entry)."""
    import torch

    vectors = torch.randn(len(vocabulary()), EMBED_DIM, generator=torch.Generator().manual_seed(EMBED_SEED))
    return vectors / vectors.norm(dim=1, keepdim=True) * EMBED_DIM ** 0.5


@functools.lru_cache(maxsize=1)
def _atom_tokens():
    """A mask of the tokens that place an atom (not padding, branch or ring tokens)."""
    import torch

    return torch.tensor([not (t == PAD or t.startswith(("[Branch", "[Ring"))) for t in vocabulary()])


def encode(smiles: list[str]):
    """Molecules → x_0 (N, MAX_TOKENS, EMBED_DIM), as the model sees them."""
    import selfies as sf
    import torch

    index = {t: i for i, t in enumerate(vocabulary())}
    ids = torch.zeros(len(smiles), MAX_TOKENS, dtype=torch.long)
    for row, smi in enumerate(smiles):
        tokens = list(sf.split_selfies(sf.encoder(smi)))
        unknown = [t for t in tokens if t not in index]
        if unknown or len(tokens) > MAX_TOKENS:
            raise ValueError(f"{smi!r} is outside the task's vocabulary or length (tokens {unknown or len(tokens)})")
        ids[row, :len(tokens)] = torch.tensor([index[t] for t in tokens])
    return token_vectors()[ids]


def decode(x) -> list[str]:
    """x_0 (N, MAX_TOKENS, EMBED_DIM) → canonical SMILES: the nearest token per position (an atom
    at the first), read as SELFIES. Token vectors share one norm, so nearest = largest dot product."""
    import selfies as sf
    import torch
    from rdkit import Chem

    _quiet_rdkit()
    scores = x.float().cpu() @ token_vectors().T  # (N, L, V)
    scores[:, 0, ~_atom_tokens()] = -torch.inf
    vocab = vocabulary()
    out = []
    for row in scores.argmax(-1).tolist():
        smi = sf.decoder("".join(vocab[i] for i in row if vocab[i] != PAD))
        mol = Chem.MolFromSmiles(smi)
        out.append(Chem.MolToSmiles(mol) if mol is not None else smi)
    return out


def real_data(split: str = "train", seed: int = 0, task_dir: str | None = None):
    """The corpus as the model sees it, (N, MAX_TOKENS, EMBED_DIM), and each one's prompt."""
    smiles = molecules(split, seed)
    return encode(smiles), [PROMPT] * len(smiles)


def real_samples(split: str = "test", seed: int = 0, task_dir: str | None = None) -> list[str]:
    """The corpus as decoded samples (canonical SMILES): the FCD's reference set."""
    return molecules(split, seed)


# Molecule properties, hash, rewards ------------------------------------------------------------

def mol_of(smiles: str):
    from rdkit import Chem

    _quiet_rdkit()
    return Chem.MolFromSmiles(smiles) if smiles else None


def canonical_smiles_hash(sample: str, metadata: dict) -> str:
    """The canonical SMILES (RDKit): two strings of one molecule are one hash. A string that does
    not parse hashes as itself, marked, so it never equals a molecule's."""
    from rdkit import Chem

    mol = mol_of(sample)
    return Chem.MolToSmiles(mol) if mol is not None else f"invalid:{sample}"


@functools.lru_cache(maxsize=1)
def _sascorer():
    from rdkit import RDConfig

    folder = os.path.join(RDConfig.RDContribDir, "SA_Score")
    if folder not in sys.path:
        sys.path.append(folder)
    import sascorer

    return sascorer


def qed(mol) -> float:
    from rdkit.Chem import QED

    return float(QED.qed(mol))


def sa_score(mol) -> float:
    """Synthetic accessibility, 1 (easy) … 10 (hard)."""
    return float(_sascorer().calculateScore(mol))


def penalized_logp(mol) -> float:
    """logP − SA − max(0, largest ring size − 6) (the JT-VAE definition, unnormalised)."""
    from rdkit.Chem import Crippen

    rings = [len(ring) for ring in mol.GetRingInfo().AtomRings()]
    return float(Crippen.MolLogP(mol) - sa_score(mol) - max(0, max(rings, default=0) - 6))


# Property name -> function of an RDKit molecule; `sa` enters sums as (10 − SA)/9 ∈ [0, 1] so that higher is better.
PROPERTIES = {"qed": qed, "sa": sa_score, "penalized_logp": penalized_logp}
_AS_REWARD = {"qed": lambda v: v, "sa": lambda v: (10.0 - v) / 9.0, "penalized_logp": lambda v: v}


def properties_reward(weights: dict[str, float], invalid_reward: float = 0.0):
    """reward_fn scoring SMILES by Σ weight·property (sa as (10 − SA)/9), with each property as a
    column; a string that is not a molecule scores `invalid_reward`."""
    from pgraft.errors import ConfigError
    from pgraft.rewards import RewardOutput

    unknown = sorted(set(weights) - set(PROPERTIES))
    if unknown or not weights:
        raise ConfigError(f"config error: reward.options.weights: {unknown or 'empty'}; properties: {sorted(PROPERTIES)}")

    def reward_fn(samples, prompts, metadata):
        rewards = np.full(len(samples), float(invalid_reward))
        columns = {name: np.full(len(samples), np.nan) for name in weights}
        for i, smi in enumerate(samples):
            mol = mol_of(smi)
            if mol is None:
                continue
            total = 0.0
            for name, weight in weights.items():
                columns[name][i] = PROPERTIES[name](mol)
                total += weight * _AS_REWARD[name](columns[name][i])
            rewards[i] = total
        return RewardOutput(rewards, columns)

    return reward_fn


def qed_reward(model_path, device):
    """QED (Bickerton et al. 2012) of the molecule, in [0, 1]."""
    return properties_reward({"qed": 1.0})


def molecule_properties_reward(model_path, device, weights: dict | None = None, invalid_reward: float = 0.0):
    """Σ weights[p]·p over qed, sa ((10 − SA)/9) and penalized_logp (default: qed 1, sa 0.5)."""
    return properties_reward(dict(weights or {"qed": 1.0, "sa": 0.5}), invalid_reward)


# Metrics and features ------------------------------------------------------------------------------

def fingerprints(smiles: list[str]):
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    return [generator.GetFingerprint(mol) for mol in map(mol_of, smiles) if mol is not None]


def internal_diversity(smiles: list[str]) -> float | None:
    """1 − mean Tanimoto similarity over distinct pairs of the molecules' Morgan fingerprints
    (radius 2, 2,048 bits); None for fewer than two molecules."""
    from rdkit import DataStructs

    fps = fingerprints(smiles)
    if len(fps) < 2:
        return None
    total = sum(sum(DataStructs.BulkTanimotoSimilarity(fp, fps[i + 1:])) for i, fp in enumerate(fps[:-1]))
    return float(1.0 - total / (len(fps) * (len(fps) - 1) / 2))


def sample_metrics(samples: list[str], seed: int = 0) -> dict:
    """validity (parses ÷ all), uniqueness (distinct canonical ÷ valid), novelty (distinct valid not
    in the train split ÷ distinct valid), internal diversity and distinct molecules."""
    valid = [canonical_smiles_hash(s, {}) for s in samples if mol_of(s) is not None]
    distinct = set(valid)
    train = set(molecules("train", seed))
    return {
        "validity": len(valid) / len(samples) if samples else None,
        "uniqueness": len(distinct) / len(valid) if valid else None,
        "novelty": len(distinct - train) / len(distinct) if distinct else None,
        "internal_diversity": internal_diversity(sorted(distinct)),
        "distinct": len(distinct),
    }


@functools.lru_cache(maxsize=1)
def _chemnet():
    import fcd

    return fcd.load_ref_model()


def chemnet_features(smiles: list[str]) -> np.ndarray:
    """(N, 512) float64 ChemNet activations (the FCD's feature space) of canonical SMILES."""
    import fcd

    canonical = [canonical_smiles_hash(s, {}).removeprefix("invalid:") for s in smiles]
    return fcd.get_predictions(_chemnet(), canonical, device="cpu").astype(np.float64)


def feature_extractor(weights: str | None):
    """ChemNet features: the Fréchet distance of the evaluation is then the FCD. Its weights ship
    in the `fcd` wheel, so `weights` is unused."""
    return chemnet_features


def show(smiles: str) -> np.ndarray:
    """The molecule drawn by RDKit, a 96×96 RGB uint8 image (blank for a string that does not parse)."""
    from rdkit.Chem import Draw

    mol = mol_of(smiles)
    if mol is None:
        return np.full((96, 96, 3), 255, np.uint8)
    return np.asarray(Draw.MolToImage(mol, size=(96, 96)).convert("RGB")).copy()


# Base model ----------------------------------------------------------------------------------

def denoiser_config(width: int = 128, layers: int = 4) -> dict:
    return dict(sample_length=MAX_TOKENS, embed_dim=EMBED_DIM, width=width, layers=layers, heads=4,
                num_class_embeds=NULL_CLASS + 1)


def save_base(net, scheduler, out: Path) -> None:
    from pgraft.models.adapters import MODEL_CARD

    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    card = {"task": "molecules", "base": "ddpm", "prompts": {PROMPT: 0}, "null_class": NULL_CLASS,
            "sample_kind": "smiles", "vocabulary": list(vocabulary()), "embed_dim": EMBED_DIM,
            "x0": "SELFIES token vectors (pgraft.tasks.molecules.encode); decode = nearest token"}
    (out / MODEL_CARD).write_text(json.dumps(card, indent=1))


def measure_base(model_dir: Path, samples: int, seed: int = 12345, steps: int = 20) -> dict:
    """Validity, uniqueness, novelty, diversity and mean QED of the base's own samples."""
    from pgraft.config import ModelSection
    from pgraft.models.adapters import load_adapter

    adapter = load_adapter(ModelSection(kind="class_sequence", path=str(model_dir), num_inference_steps=steps,
                                        guidance_scale=1.0, device="cpu"))
    smiles = []
    for lo in range(0, samples, 256):
        count = min(256, samples - lo)
        smiles += list(adapter.rollout([PROMPT] * count, list(range(seed + lo, seed + lo + count)), []).samples)
    out = sample_metrics(smiles)
    out["qed_mean"] = float(np.mean(qed_reward(None, None)(smiles, [], []).rewards))
    return out


def pretrain_molecules(out: str | Path, seed: int = 0, steps: int = 3000, width: int = 64, layers: int = 3,
                       eval_samples: int = 256, prediction: str = "sample", progress: bool = True) -> dict:
    """Train and save the DDPM base `ddpm/` on the train split, plus `summary.json`."""
    import torch

    from pgraft.models.sequence import SequenceDenoiser
    from pgraft.tasks.training import train_class_denoiser

    out = Path(out)
    start = time.perf_counter()
    x = encode(molecules("train", seed))
    torch.manual_seed(seed)
    net = SequenceDenoiser(**denoiser_config(width, layers))
    net, sampler, loss = train_class_denoiser(net, x, torch.zeros(len(x), dtype=torch.long), NULL_CLASS, "ddpm",
                                              steps, seed, progress=progress, label="pretrain molecules",
                                              prediction_type=prediction, clip_sample=False)
    save_base(net, sampler, out / "ddpm")
    summary = {"seed": seed, "steps": steps, "prediction": prediction, "train_molecules": len(x), "held_out": len(molecules("test", seed)),
               "vocabulary": len(vocabulary()), "ddpm_final_loss": loss,
               "ddpm_seconds": round(time.perf_counter() - start, 1)}
    if eval_samples:
        summary.update({f"base_{k}": v for k, v in measure_base(out / "ddpm", eval_samples).items()})
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def pretrain_and_publish(location: str, seed: int = 0, threads: int | None = None, **options) -> dict:
    """Pretrain on the node this runs on (a Ray task in the round pipeline) and publish `ddpm/`
    and `summary.json` (last) to `location`, a local folder or a storage URI."""
    from pgraft.tasks.training import publish

    return publish(location, lambda out, **kw: pretrain_molecules(out, seed=seed, **kw), ("ddpm",), threads, **options)
