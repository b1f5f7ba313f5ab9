"""pgraft.models.corrector: the Gaussian fit against closed forms, the card checks, save/load."""

import json
import shutil

import numpy as np
import pytest
import torch

from pgraft import contract
from pgraft.models.corrector import (
    NoiseCorrector,
    base_weights_digest,
    check_card,
    corrector_card,
    corrector_network,
    fit_gaussian,
    load_corrector,
    save_corrector,
)
from pgraft.models.fetch import ModelError


def correlated_noises(n=4000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[1.5, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [0.0, 0.3, 1.1, 0.0], [0.2, 0.0, 0.0, 0.5]])
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0])
    return (torch.randn(n, 4, generator=gen) @ mix.T + shift).reshape(n, 1, 2, 2), mix, shift


def test_full_gaussian_fit_is_the_sample_mean_and_covariance():
    z, mix, shift = correlated_noises()
    fit = fit_gaussian(z, "full", ridge=0.0)
    flat = z.flatten(1).double().numpy()
    assert np.allclose(fit.mean.numpy(), flat.mean(0), atol=1e-5)
    cov = (fit.scale @ fit.scale.T).double().numpy()
    assert np.allclose(cov, np.cov(flat.T, bias=True), atol=1e-4)
    assert np.allclose(cov, (mix @ mix.T).numpy(), atol=0.15)  # and near the true one
    assert torch.allclose(fit.color(fit.whiten(z)), z, atol=1e-4)
    u = fit.whiten(z).flatten(1).double()
    assert torch.allclose(u.T @ u / len(u) - torch.outer(u.mean(0), u.mean(0)), torch.eye(4, dtype=torch.float64),
                          atol=1e-4)
    assert fit.parameters == 4 + 10 and fit.flops_per_sample() == 2 * 16 + 4


def test_diagonal_fit_and_the_full_covariance_limit():
    z, _, _ = correlated_noises()
    fit = fit_gaussian(z, "diagonal", ridge=0.0)
    assert np.allclose(fit.scale.numpy(), z.flatten(1).double().std(0, unbiased=False).numpy(), atol=1e-5)
    assert fit.parameters == 8
    with pytest.raises(ModelError, match="corrector.covariance=diagonal"):
        fit_gaussian(torch.zeros(3, 4, 48, 48), "full")
    with pytest.raises(ModelError, match="at least 2 inverse noises"):
        fit_gaussian(torch.zeros(1, 4), "full")


def test_gaussian_corrector_draws_the_fitted_distribution():
    z, _, shift = correlated_noises()
    fit = fit_gaussian(z, "full", ridge=0.0)
    corrector = NoiseCorrector({"sampling_steps": 0, "latent_shape": [1, 2, 2]}, fit)
    out = corrector.correct(torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(1)))
    flat = out.flatten(1).double()
    assert torch.allclose(flat.mean(0), fit.mean.double(), atol=0.05)
    assert torch.allclose(torch.cov(flat.T), (fit.scale @ fit.scale.T).double(), atol=0.08)


def test_residual_training_pair_is_rectified_flow_less_the_gaussian_velocity():
    from pgraft.models.corrector import gaussian_velocity, residual_training_pair

    u, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([0.0, 250.0, 900.0])
    x_s, target = residual_training_pair(u, eps, t)
    s = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(x_s, (1 - s) * u + s * eps, atol=1e-6)
    assert torch.allclose(target + gaussian_velocity(x_s, t / 1000), eps - u, atol=1e-5)
    assert torch.allclose(target[0], eps[0] - u[0] + u[0], atol=1e-6)  # s = 0: v_G(u, 0) = −u


def _base(tmp_path, name="base"):
    folder = tmp_path / name
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(name.encode())
    return str(folder)


def test_save_load_and_card_checks(tmp_path):
    base = _base(tmp_path)
    z, _, _ = correlated_noises(200)
    fit = fit_gaussian(torch.randn(300, 1, 8, 8), "full")
    torch.manual_seed(0)
    net = corrector_network((1, 8, 8), [8, 16], 1)
    card = corrector_card("flow", base, base_weights_digest(base), 8, [1, 8, 8], 1.0, "runs/x/inversion/a", 300, 3, "full")
    save_corrector(tmp_path / "c", card, fit, net)
    loaded = load_corrector(str(tmp_path / "c"))
    assert loaded.card == json.loads((tmp_path / "c" / contract.CORRECTOR_CARD).read_text())
    eps = torch.randn(5, 1, 8, 8)
    diff = (loaded.correct(eps) - NoiseCorrector(card, fit, net.eval()).correct(eps)).abs().max()
    assert diff < 1e-5, diff  # the same weights, read back (kernel choice may differ in the last bit)
    # FLOPs: the network's forward counted per step, plus the Gaussian's matrix product.
    one_step = NoiseCorrector({**card, "sampling_steps": 1}, fit, net).flops_per_sample() - fit.flops_per_sample()
    assert one_step > 0 and loaded.flops_per_sample() == 3 * one_step + fit.flops_per_sample()

    check_card(loaded.card, "c", base, 8, (1, 8, 8), base_folder=base)
    copy = tmp_path / "copy"  # the same weights elsewhere (another node, storage) are the same base
    shutil.copytree(base, copy)
    check_card(loaded.card, "c", str(copy), 8, (1, 8, 8), base_folder=copy)
    other = _base(tmp_path, "other")
    with pytest.raises(ModelError, match=r"was fitted for the base model .* not model.path .*other' \(their weights differ\)"):
        check_card(loaded.card, "c", other, 8, (1, 8, 8), base_folder=other)
    with pytest.raises(ModelError, match="fitted to inversions with 8 Euler steps; model.num_inference_steps is 4"):
        check_card(loaded.card, "c", base, 4, (1, 8, 8))
    with pytest.raises(ModelError, match=r"makes latents of shape \(1, 8, 8\); the model takes \(4, 8, 8\)"):
        check_card(loaded.card, "c", base, 8, (4, 8, 8))
    with pytest.raises(ModelError, match="is not a noise corrector folder"):
        load_corrector(base)


def test_minibatch_ot_pairs_recovers_a_permutation():
    from pgraft.models.corrector import minibatch_ot_pairs

    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    data = noise[perm]
    order = minibatch_ot_pairs(noise, data)
    assert torch.equal(data[order], noise)  # identical point sets: the optimal plan is the identity matching
    other = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    paired = other[minibatch_ot_pairs(noise, other)]
    assert sorted(minibatch_ot_pairs(noise, other).tolist()) == list(range(64))
    assert (paired - noise).pow(2).sum() < (other - noise).pow(2).sum()  # never costs more than the given order


def test_gaussian_velocity_closed_forms():
    from pgraft.models.corrector import euler_gaussian_gain, gaussian_step_gain, gaussian_velocity

    # E[ε − u | x_s] for independent N(0, 1) u, ε, by regression on samples: slope (2s − 1)/((1 − s)² + s²).
    gen = torch.Generator().manual_seed(0)
    u, eps = torch.randn(200000, generator=gen, dtype=torch.float64), torch.randn(200000, generator=gen,
                                                                                   dtype=torch.float64)
    for s in (0.2, 0.5, 0.9):
        x = (1 - s) * u + s * eps
        slope = float((x * (eps - u)).mean() / (x * x).mean())
        assert slope == pytest.approx(float(gaussian_velocity(torch.ones(1, 1), torch.tensor([s]))), abs=0.01)
    # Its exact flow is the identity from s = 1 to 0 (the gains multiply to 1) while Euler shrinks.
    assert float(gaussian_step_gain(torch.tensor(1.0), torch.tensor(0.5))
                 * gaussian_step_gain(torch.tensor(0.5), torch.tensor(0.0))) == pytest.approx(1.0)
    assert euler_gaussian_gain(4) == pytest.approx(0.75 * 0.8 * 1.0 * 1.2)
    assert euler_gaussian_gain(1) == 0.0 and euler_gaussian_gain(64) > 0.97


def test_untrained_flow_corrector_is_exactly_the_gaussian():
    fit = fit_gaussian(torch.randn(500, 1, 8, 8) * 1.3 + 0.2, "full")
    torch.manual_seed(0)
    net = corrector_network((1, 8, 8), [8, 16], 1).eval()  # zero output layer: zero residual
    eps = torch.randn(16, 1, 8, 8)
    for steps in (1, 2, 4):
        flow = NoiseCorrector({"sampling_steps": steps, "latent_shape": [1, 8, 8]}, fit, net)
        assert torch.allclose(flow.correct(eps), fit.color(eps), atol=1e-5)
