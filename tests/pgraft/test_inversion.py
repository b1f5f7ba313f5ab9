"""pgraft.inversion against closed forms: a linear flow has an analytic Euler inverse."""

import torch

from pgraft.inversion import EulerGrid, backward_euler_step, euler_sample, invert, rms


def uniform_grid(steps: int) -> EulerGrid:
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return EulerGrid(sigmas=sigmas, timesteps=sigmas[:-1] * 1000)


def linear_velocity(a: torch.Tensor, b: torch.Tensor):
    """v(x, t) = A x + b(t), A a fixed (D, D) matrix, b depending on the timestep."""
    def velocity(x, t, rows):
        return x @ a.T + b * (t / 1000)
    return velocity


def test_linear_flow_inverse_matches_the_analytic_one():
    torch.manual_seed(0)
    d, steps = 6, 8
    a = 0.3 * torch.randn(d, d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64)
    grid = uniform_grid(steps)
    velocity = linear_velocity(a, b)
    noise = torch.randn(5, d, dtype=torch.float64)
    x = euler_sample(velocity, noise, grid)
    # Analytic inverse of each step: x_k = (I + η A)⁻¹ (x_{k+1} − η b(t_k)).
    expected = x.clone()
    for k in reversed(range(steps)):
        eta = grid.step_size(k)
        m = torch.eye(d, dtype=torch.float64) + eta * a
        expected = torch.linalg.solve(m, (expected - eta * b * grid.timesteps[k] / 1000).T).T
    result = invert(velocity, x, grid, tolerance=1e-12, max_iterations=200)
    assert torch.allclose(expected, noise, atol=1e-10)  # the closed form itself is right
    assert (result.noise - noise).abs().max() < 1e-5
    assert result.converged.all()
    assert (result.reconstruction_error(x, velocity, grid) < 1e-5).all()


def test_fixed_point_converges_on_a_smooth_velocity_and_counts_iterations():
    grid = uniform_grid(4)
    velocity = lambda x, t, rows: torch.tanh(x) * 0.5  # noqa: E731 - Lipschitz 0.5, |η|·L = 0.125
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    result = invert(velocity, x, grid, tolerance=1e-9, max_iterations=100)
    assert result.converged.all()
    assert (result.residual <= 1e-9).all()
    # A contraction of factor ≤ 0.125 needs about log(1e-9)/log(0.125) ≈ 10 iterations per step, never the cap.
    assert (result.max_step_iterations < 20).all() and (result.iterations >= 4).all()
    assert (rms(euler_sample(velocity, result.noise, grid) - x) < 1e-8).all()


def test_non_convergence_is_reported_per_sample():
    """v(x) = c_i x with |η c_i| > 1 for some samples: their fixed-point map expands, so they
    must come back as not converged while the others converge."""
    grid = uniform_grid(2)  # η = −0.5
    scale = torch.tensor([0.2, 4.0, 0.5, 6.0], dtype=torch.float64)

    def velocity(x, t, rows):
        return scale[rows].view(-1, 1) * x

    x = torch.ones(4, 3, dtype=torch.float64)
    result = invert(velocity, x, grid, tolerance=1e-8, max_iterations=40)
    assert result.converged.tolist() == [True, False, True, False]
    assert (result.max_step_iterations[~result.converged] == 40).all()
    assert (result.max_step_iterations[result.converged] < 40).all()
    good = result.converged
    assert (result.reconstruction_error(x, velocity, grid)[good] < 1e-6).all()


def test_backward_step_only_moves_unconverged_samples():
    grid = uniform_grid(1)
    calls = []

    def velocity(x, t, rows):
        calls.append(rows.tolist())
        return torch.where(rows.view(-1, 1) == 0, 0.0 * x, 0.5 * torch.sin(x))

    _, iterations, _ = backward_euler_step(velocity, torch.ones(2, 2, dtype=torch.float64), grid, 0, 1e-10, 100)
    assert iterations[0] == 1 < iterations[1]  # sample 0 is a fixed point already: one update of 0 stops it
    assert calls[-1] == [1]
