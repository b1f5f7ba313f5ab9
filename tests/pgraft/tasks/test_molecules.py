"""The molecules task: data, the SELFIES representation, hash, rewards, metrics and FCD, and a
deterministic pretraining whose model loads through the real adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgraft.config import ModelSection
from pgraft.metrics import frechet_distance_of
from pgraft.models.adapters import load_adapter
from pgraft.tasks import get_task, molecules


def test_corpus_is_rdkits_nci_file_filtered_and_split(capsys):
    smiles, skipped = molecules.read_smiles_file(molecules.default_smiles_file())
    assert (len(smiles), skipped) == (4991, 8)  # 4,999 lines, 4,991 parse
    assert "8 of 4999 lines" in capsys.readouterr().err
    train, test = molecules.molecules("train"), molecules.molecules("test")
    assert len(train) + len(test) == len(molecules.corpus()) and not set(train) & set(test)
    assert len(test) == round(0.1 * len(molecules.corpus()))


def test_a_smiles_file_with_bad_lines_says_how_many_were_skipped(tmp_path, capsys):
    path = tmp_path / "mols.smi"
    path.write_text("CCO 1\nnot-a-molecule 2\n\nC1CC 3\nc1ccccc1\n")
    smiles, skipped = molecules.read_smiles_file(path)
    assert smiles == ["CCO", "c1ccccc1"] and skipped == 2
    assert f"2 of 4 lines of {path} did not parse" in capsys.readouterr().err
    with pytest.raises(molecules.MoleculeDataError, match="nope.smi does not exist"):
        molecules.read_smiles_file(tmp_path / "nope.smi")


def test_encode_decode_round_trips_the_corpus_and_any_vectors_decode_to_molecules():
    from rdkit import Chem

    sample = list(molecules.corpus()[:300])
    assert molecules.decode(molecules.encode(sample)) == sample
    noise = torch.randn(400, molecules.MAX_TOKENS, molecules.EMBED_DIM, generator=torch.Generator().manual_seed(0))
    for x in (noise, 3 * noise):  # a random model's x_0 is anything: every decoding is still a molecule
        decoded = molecules.decode(x)
        assert all(s and Chem.MolFromSmiles(s) is not None for s in decoded)


def test_canonical_smiles_hash_equates_two_strings_of_one_molecule():
    spec = get_task("molecules")
    from pgraft.hashing import get_hash

    h = get_hash(spec.hash)
    assert h("OCC", {}) == h("C(O)C", {}) == "CCO" != h("CCN", {})
    assert h("C1CC", {}) == "invalid:C1CC"


def test_rewards_are_rdkit_properties_with_weights():
    from rdkit import Chem
    from rdkit.Chem import QED

    smiles = ["CC(=O)Nc1ccc(O)cc1", "c1ccccc1", "C1CC"]
    out = molecules.qed_reward(None, None)(smiles, [], [])
    assert out.rewards[0] == pytest.approx(QED.qed(Chem.MolFromSmiles(smiles[0]))) and out.rewards[2] == 0.0
    mixed = molecules.molecule_properties_reward(None, None, weights={"qed": 1.0, "sa": 0.5})(smiles, [], [])
    sa = mixed.columns["sa"][:2]
    np.testing.assert_allclose(mixed.rewards[:2], out.rewards[:2] + 0.5 * (10 - sa) / 9)
    assert np.isnan(mixed.columns["sa"][2]) and 1 <= sa.min() and sa.max() <= 10
    from pgraft.errors import ConfigError

    with pytest.raises(ConfigError, match="reward.options.weights"):
        molecules.molecule_properties_reward(None, None, weights={"logp": 1.0})


def test_metrics_on_hand_made_sets():
    train = set(molecules.molecules("train"))
    known = next(iter(sorted(train)))
    m = molecules.sample_metrics(["OCC", "C(O)C", "C1CC", known, "CCCCCCCCCCCCCCN"])
    assert m["validity"] == 4 / 5 and m["uniqueness"] == 3 / 4 and m["distinct"] == 3
    assert m["novelty"] == pytest.approx(2 / 3 if "CCO" not in train else 1 / 3)
    assert molecules.internal_diversity(["CCO", "OCC"]) == 0.0  # one molecule twice: similarity 1
    assert 0 < molecules.internal_diversity(["CCO", "c1ccccc1", "CCN"]) <= 1


def test_fcd_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    import fcd

    reference = molecules.real_samples("test")[:200]
    feats = molecules.chemnet_features(reference)
    assert frechet_distance_of(feats, feats) == pytest.approx(0.0, abs=1e-6)
    by_size = sorted(molecules.molecules("train"), key=len)
    small, large = by_size[:200], by_size[-200:]
    half = reference[:100] + small[:100]
    d_half = frechet_distance_of(feats, molecules.chemnet_features(half))
    d_small = frechet_distance_of(feats, molecules.chemnet_features(small))
    assert 0 < d_half < d_small
    assert d_small == pytest.approx(fcd.get_fcd(reference, small), rel=1e-4)  # the `fcd` package's own figure
    assert frechet_distance_of(feats, molecules.chemnet_features(large)) > d_half


def test_short_pretrain_is_deterministic_and_samples_molecules(tmp_path):
    from rdkit import Chem

    kwargs = dict(steps=3, width=16, layers=1, eval_samples=0, progress=False)
    molecules.pretrain_molecules(tmp_path / "a", **kwargs)
    molecules.pretrain_molecules(tmp_path / "b", **kwargs)
    for rel in ["ddpm/unet/diffusion_pytorch_model.safetensors", "ddpm/pgraft_model.json"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    card = json.loads((tmp_path / "a/ddpm/pgraft_model.json").read_text())
    assert card["task"] == "molecules" and card["vocabulary"] == list(molecules.vocabulary())
    adapter = load_adapter(ModelSection(kind="class_sequence", path=str(tmp_path / "a/ddpm"), num_inference_steps=4,
                                        device="cpu"))
    rollout = adapter.rollout([molecules.PROMPT] * 3, [0, 1, 2], [2])
    assert rollout.sample_kind == "smiles" and rollout.latents["x_2"].shape == (3, molecules.MAX_TOKENS, molecules.EMBED_DIM)
    assert all(Chem.MolFromSmiles(s) is not None for s in rollout.samples)
    assert rollout.samples == molecules.decode(rollout.latents["x_0"])
