"""P-GRAFT training targets (docs/DESIGN.md §4) as small pure functions.

A Gaussian path x_s = a_s x_0 + σ_s ε is Markov for s > t:
    x_s = (a_s/a_t) x_t + σ_{s|t} ε′,   σ_{s|t}² = σ_s² − (a_s/a_t)² σ_t².
Treating accepted x_t as data, the regression targets in the model's own parametrisation are
    ε* = (σ_s/σ_{s|t}) ε′,  x₀* = (x_s − σ_s ε*)/a_s,  v*(DDPM) = a_s ε* − σ_s x₀*,  v*(flow) = ε* − x₀*.
t = 0 (a = 1, σ = 0) gives σ_{s|t} = σ_s and ε* = ε′: the ordinary diffusion loss (GRAFT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PathCoefficients:
    """a and σ of the Gaussian path at some noise levels (broadcastable tensors)."""

    a: torch.Tensor
    sigma: torch.Tensor


def ddpm_coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> PathCoefficients:
    """DDPM/DDIM: a = √ᾱ, σ = √(1 − ᾱ) at integer timesteps."""
    abar = alphas_cumprod.to(timesteps.device, torch.float64)[timesteps.long()]
    return PathCoefficients(abar.sqrt(), (1 - abar).sqrt())


def flow_coefficients(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> PathCoefficients:
    """Rectified flow: s = timestep / T, a = 1 − s, σ = s."""
    s = timesteps.to(torch.float64) / num_train_timesteps
    return PathCoefficients(1 - s, s)


def clean() -> PathCoefficients:
    """t = 0: the data itself."""
    return PathCoefficients(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))


def conditional_sigma(s: PathCoefficients, t: PathCoefficients) -> torch.Tensor:
    """σ_{s|t} = √(σ_s² − (a_s/a_t)² σ_t²)."""
    ratio = s.a / t.a
    return (s.sigma**2 - ratio**2 * t.sigma**2).clamp_min(0).sqrt()


def forward_from_t(x_t: torch.Tensor, s: PathCoefficients, t: PathCoefficients, noise: torch.Tensor) -> torch.Tensor:
    """x_s = (a_s/a_t) x_t + σ_{s|t} ε′."""
    ratio = _b(s.a / t.a, x_t)
    return ratio * x_t + _b(conditional_sigma(s, t), x_t) * noise


def epsilon_target(s: PathCoefficients, t: PathCoefficients, noise: torch.Tensor) -> torch.Tensor:
    """ε* = (σ_s/σ_{s|t}) ε′."""
    return _b(s.sigma / conditional_sigma(s, t), noise) * noise


def x0_target(x_s: torch.Tensor, s: PathCoefficients, eps_star: torch.Tensor) -> torch.Tensor:
    """x₀* = (x_s − σ_s ε*)/a_s."""
    return (x_s - _b(s.sigma, x_s) * eps_star) / _b(s.a, x_s)


def v_target(x_s: torch.Tensor, s: PathCoefficients, eps_star: torch.Tensor) -> torch.Tensor:
    """DDPM v-prediction: v* = a_s ε* − σ_s x₀*."""
    return _b(s.a, x_s) * eps_star - _b(s.sigma, x_s) * x0_target(x_s, s, eps_star)


def flow_velocity_target(x_s: torch.Tensor, s: PathCoefficients, eps_star: torch.Tensor) -> torch.Tensor:
    """Rectified flow: v* = ε* − x₀*."""
    return eps_star - x0_target(x_s, s, eps_star)


# prediction type -> target given (x_s, s, ε*)
TARGETS = {
    "epsilon": lambda x_s, s, eps: eps,
    "sample": x0_target,
    "v_prediction": v_target,
    "flow": flow_velocity_target,
}


def training_pair(x_t: torch.Tensor, s: PathCoefficients, t: PathCoefficients, noise: torch.Tensor,
                  prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input x_s, regression target) for accepted latents x_t at noise levels s > t."""
    x_s = forward_from_t(x_t.double(), s, t, noise.double())
    eps_star = epsilon_target(s, t, noise.double())
    target = TARGETS[prediction_type](x_s, s, eps_star)
    return x_s.to(x_t.dtype), target.to(x_t.dtype)


def rectified_flow_pair(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow between data x0 (s = 0) and noise (s = 1), one s in [0, 1] per sample:
    (x_s = (1 − s)·x0 + s·ε, velocity target ε − x0). Pretraining a flow base and training a
    noise corrector both regress on it."""
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def _b(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (or scalar) coefficient over a batch of latents."""
    coef = coef.to(like.device, like.dtype)
    return coef.reshape(-1, *([1] * (like.ndim - 1))) if coef.ndim == 1 else coef
