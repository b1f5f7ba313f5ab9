"""P-GRAFT targets against closed forms (docs/DESIGN.md §4).

With Gaussian data x_t ~ N(m, c²) (per coordinate), x_s = (a_s/a_t) x_t + σ_{s|t} ε′ is
Gaussian too, so the optimal predictor of each target given x_s is linear with analytic
coefficients. A least-squares fit on (x_s, target) pairs must recover them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgraft import targets

N = 400_000


def fit_line(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    slope, intercept = np.polyfit(x.numpy().ravel(), y.numpy().ravel(), 1)
    return float(slope), float(intercept)


def gaussian_x_t(m: float, c: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (m + c * torch.randn(N, 1, generator=g)).double()


def coefs(a: float, sigma: float) -> targets.PathCoefficients:
    return targets.PathCoefficients(torch.tensor(a, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))


DDPM = ((0.6, 0.8), (0.95, np.sqrt(1 - 0.95**2)))
FLOW = ((0.3, 0.7), (0.8, 0.2))
GRAFT = ((0.6, 0.8), (1.0, 0.0))  # t = 0


@pytest.mark.parametrize("s, t, prediction", [
    (*DDPM, "epsilon"), (*DDPM, "sample"), (*DDPM, "v_prediction"),
    (*GRAFT, "epsilon"), (*GRAFT, "v_prediction"),
    (*FLOW, "flow"), (*FLOW, "epsilon"), (*FLOW, "sample"),
])
def test_least_squares_recovers_the_optimal_linear_predictor(s, t, prediction):
    m, c = 0.7, 0.5
    s_coef, t_coef = coefs(*s), coefs(*t)
    x_t = gaussian_x_t(m, c)
    noise = torch.randn(N, 1, generator=torch.Generator().manual_seed(1)).double()
    x_s, target = targets.training_pair(x_t, s_coef, t_coef, noise, prediction)

    # Marginal at s under the shaped distribution: x_s = r x_t + σ_{s|t} ε′, r = a_s/a_t.
    r = s[0] / t[0]
    sig_st = np.sqrt(s[1] ** 2 - r**2 * t[1] ** 2)
    mean_s, var_s = r * m, r**2 * c**2 + sig_st**2
    # E[ε′ | x_s] = σ_{s|t}/var_s (x_s − mean_s); ε* = (σ_s/σ_{s|t}) ε′.
    eps_slope = s[1] / var_s
    eps_intercept = -eps_slope * mean_s
    expected = {
        "epsilon": (eps_slope, eps_intercept),
        "sample": ((1 - s[1] * eps_slope) / s[0], -s[1] * eps_intercept / s[0]),
    }
    x0_slope, x0_int = expected["sample"]
    expected["v_prediction"] = (s[0] * eps_slope - s[1] * x0_slope, s[0] * eps_intercept - s[1] * x0_int)
    expected["flow"] = (eps_slope - x0_slope, eps_intercept - x0_int)
    slope, intercept = fit_line(x_s, target)
    assert slope == pytest.approx(expected[prediction][0], abs=0.01)
    assert intercept == pytest.approx(expected[prediction][1], abs=0.01)


def test_t_zero_is_the_standard_diffusion_loss():
    """GRAFT: with a_t = 1, σ_t = 0, x_s and the ε target are those of ordinary training."""
    x0 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    ts = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(2))
    s = targets.ddpm_coefficients(abar, ts)
    x_s, eps = targets.training_pair(x0, s, targets.clean(), noise, "epsilon")
    standard = abar[ts].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[ts]).sqrt().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(x_s, standard.float())
    torch.testing.assert_close(eps, noise)
    _, v = targets.training_pair(x0, s, targets.clean(), noise, "v_prediction")
    standard_v = abar[ts].sqrt().view(-1, 1, 1, 1) * noise - (1 - abar[ts]).sqrt().view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(v, standard_v.float(), atol=1e-5, rtol=1e-5)
    flow_s = targets.flow_coefficients(ts.double())
    _, velocity = targets.training_pair(x0, flow_s, targets.clean(), noise, "flow")
    torch.testing.assert_close(velocity, noise - x0, atol=1e-5, rtol=1e-5)


def test_conditional_sigma_closed_form():
    s, t = coefs(0.6, 0.8), coefs(0.9, np.sqrt(1 - 0.81))
    expected = np.sqrt(0.64 - (0.6 / 0.9) ** 2 * 0.19)
    assert float(targets.conditional_sigma(s, t)) == pytest.approx(expected)
    assert float(targets.conditional_sigma(s, targets.clean())) == pytest.approx(0.8)
