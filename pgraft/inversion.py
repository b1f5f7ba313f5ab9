"""Inverting a flow sampler (docs/DESIGN.md §5): pure functions over a velocity field.

The discrete Euler sampler Φ maps noise z = x_0 at σ_0 = 1 to a sample x_K at σ_K = 0:

    x_{k+1} = x_k + η_k v(x_k, t_k),   η_k = σ_{k+1} − σ_k  (negative),

with t_k the model's timestep input at σ_k. Its inverse takes each step backwards (backward
Euler): x_k solves x_k = x_{k+1} − η_k v(x_k, t_k), found by the fixed-point iteration

    y ← x_{k+1} − η_k v(y, t_k),   y⁰ = x_{k+1},

a contraction, hence convergent to the unique solution, when |η_k|·Lip(v) < 1. Each sample
stops iterating once its update is below the tolerance, so its result does not depend on the
other samples of its batch; a sample still moving at the iteration cap is reported as not
converged (per sample, per step), never silently accepted.

Note the indexing: here k counts *sampler steps taken* from the noise (x_0 = z, x_K = the
sample), which is the opposite of the x_T … x_0 naming of stored latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# v(x, t, rows) -> velocity at timestep input t, batched over the first dimension of x;
# `rows` are the batch positions of x's samples (the fixed-point iteration passes only the
# samples still iterating), so a velocity can pick each sample's condition.
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EulerGrid:
    """The sampler's discretisation: noise levels σ_0 = 1 > … > σ_K = 0 and the timestep the
    model is given at each of the K steps."""

    sigmas: torch.Tensor  # (K + 1,)
    timesteps: torch.Tensor  # (K,)

    def __post_init__(self):
        if self.sigmas.ndim != 1 or self.timesteps.ndim != 1 or len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError(f"an Euler grid needs K + 1 noise levels for K timesteps, got {len(self.sigmas)} and "
                             f"{len(self.timesteps)}")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def step_size(self, k: int) -> float:
        return float(self.sigmas[k + 1] - self.sigmas[k])


@dataclass
class Inversion:
    """Φ⁻¹ of a batch: the noise, and per sample how the iterations went."""

    noise: torch.Tensor  # (B, ...) z with Φ(z) ≈ x
    iterations: torch.Tensor  # (B,) int64: fixed-point iterations summed over the K steps
    max_step_iterations: torch.Tensor  # (B,) int64: the most any one step needed
    converged: torch.Tensor  # (B,) bool: every step met the tolerance within the cap
    residual: torch.Tensor  # (B,) float: the largest last update (RMS) over the steps

    def reconstruction_error(self, x: torch.Tensor, velocity: Velocity, grid: EulerGrid) -> torch.Tensor:
        """‖Φ(Φ⁻¹(x)) − x‖ per sample (RMS over elements): does the forward sampler land back on x?"""
        return rms(euler_sample(velocity, self.noise, grid) - x)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square per sample (over every dimension but the first)."""
    return x.flatten(1).float().pow(2).mean(1).sqrt()


def euler_step(velocity: Velocity, x: torch.Tensor, grid: EulerGrid, k: int) -> torch.Tensor:
    return x + grid.step_size(k) * velocity(x, grid.timesteps[k], torch.arange(len(x)))


def euler_sample(velocity: Velocity, noise: torch.Tensor, grid: EulerGrid) -> torch.Tensor:
    """Φ: K forward Euler steps from the noise."""
    x = noise
    for k in range(grid.steps):
        x = euler_step(velocity, x, grid, k)
    return x


def backward_euler_step(velocity: Velocity, x_next: torch.Tensor, grid: EulerGrid, k: int, tolerance: float,
                        max_iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve x_k + η_k v(x_k, t_k) = x_next per sample by fixed-point iteration.

    Returns (x_k, iterations per sample, last update RMS per sample). Samples whose update
    falls to `tolerance` (RMS over elements) are frozen; the rest iterate until the cap."""
    if tolerance <= 0 or max_iterations < 1:
        raise ValueError("tolerance must be positive and max_iterations at least 1")
    eta, t = grid.step_size(k), grid.timesteps[k]
    y = x_next.clone()
    iterations = torch.zeros(len(y), dtype=torch.int64)
    last_update = torch.full((len(y),), float("inf"))
    active = torch.ones(len(y), dtype=torch.bool)
    for _ in range(max_iterations):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        proposal = x_next[idx] - eta * velocity(y[idx], t, idx)
        update = rms(proposal - y[idx]).cpu()
        y[idx] = proposal
        iterations[idx] += 1
        last_update[idx] = update
        # Diverging samples (inf/nan) are stopped too: more iterations cannot bring them back.
        active[idx] = (update > tolerance) & torch.isfinite(update)
    return y, iterations, last_update


def invert(velocity: Velocity, x: torch.Tensor, grid: EulerGrid, tolerance: float = 1e-4,
           max_iterations: int = 30) -> Inversion:
    """Φ⁻¹: backward Euler through every step, from the sample back to the noise."""
    y = x.clone()
    total = torch.zeros(len(x), dtype=torch.int64)
    most = torch.zeros(len(x), dtype=torch.int64)
    worst = torch.zeros(len(x))
    for k in reversed(range(grid.steps)):
        y, iterations, update = backward_euler_step(velocity, y, grid, k, tolerance, max_iterations)
        total += iterations
        most = torch.maximum(most, iterations)
        worst = torch.maximum(worst, torch.nan_to_num(update, nan=float("inf")))
    return Inversion(noise=y, iterations=total, max_step_iterations=most, converged=worst <= tolerance,
                     residual=worst)
