"""Noise correctors (docs/DESIGN.md §5): a map ε ~ N(0, I) → z placed in front of a frozen
flow model, fitted to the inverse noises Φ⁻¹(x) of real data.

Two kinds share one sampling path, z = μ + L·u:
- `gaussian`: u = ε, with μ and L (Cholesky factor of the covariance, or per-element
  standard deviations) fitted in closed form to the inverse noises;
- `flow`: u is the output of a small rectified flow from ε (σ = 1) to the inverse noises
  *whitened by that Gaussian fit* (σ = 0). Its velocity is split into the closed-form
  velocity of whitened Gaussian data, v_G(x, s) = (2s − 1)/((1 − s)² + s²)·x, and a residual
  learned by an unconditional `UNet2DModel` (output layer zero at initialisation). Sampling
  integrates v_G exactly (x ← x·√(f(s′)/f(s)), f(s) = (1 − s)² + s²) and the residual by
  Euler steps. So the Gaussian is the flow's zero-capacity limit at any step count, and the
  network only learns what is not Gaussian. (Plain Euler on the whole velocity shrinks even
  Gaussian data: 4 steps scale it by 0.72, see `euler_gaussian_gain`.)

A corrector folder holds `corrector.json` (the card: kind, the base model's location and
content digest, its sampler steps and latent shape), `gaussian.safetensors` and, for a flow,
`unet/`. Loading checks the card against the base model it is put in front of.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pgraft import contract
from pgraft.inversion import EulerGrid
from pgraft.models.fetch import ModelError, fetch_model, is_remote, local_folder, model_file_exists
from pgraft.storage import open_storage
from pgraft.targets import rectified_flow_pair

GAUSSIAN_FILE = "gaussian.safetensors"
NETWORK_DIR = "unet"
# A full covariance is a D×D matrix: beyond this many elements per latent, fit a diagonal one.
MAX_FULL_COVARIANCE_DIM = 8192


@dataclass
class GaussianFit:
    """z = mean + scale·u: `scale` is lower triangular (D, D) for a full covariance, (D,) for a
    diagonal one; the latent shape is restored around it."""

    mean: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D, D) lower triangular, or (D,)

    @property
    def full(self) -> bool:
        return self.scale.ndim == 2

    def color(self, u: torch.Tensor) -> torch.Tensor:
        flat = u.flatten(1).to(self.mean.dtype)
        z = flat @ self.scale.T if self.full else flat * self.scale
        return (z + self.mean).reshape(u.shape).to(u.dtype)

    def whiten(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(1).to(self.mean.dtype) - self.mean
        if self.full:
            u = torch.linalg.solve_triangular(self.scale, flat.T, upper=False).T
        else:
            u = flat / self.scale
        return u.reshape(z.shape).to(z.dtype)

    @property
    def parameters(self) -> int:
        d = len(self.mean)
        return d + (d * (d + 1) // 2 if self.full else d)

    def flops_per_sample(self) -> int:
        d = len(self.mean)
        return 2 * d * d + d if self.full else 2 * d


def fit_gaussian(noises: torch.Tensor, covariance: str = "full", ridge: float = 1e-4) -> GaussianFit:
    """Maximum-likelihood mean and covariance of the inverse noises (N, ...), plus `ridge`·I
    so the Cholesky factor exists with fewer samples than dimensions."""
    flat = noises.flatten(1).double()
    n, d = flat.shape
    if n < 2:
        raise ModelError(f"a Gaussian corrector needs at least 2 inverse noises, got {n}")
    mean = flat.mean(0)
    centred = flat - mean
    if covariance == "diagonal":
        return GaussianFit(mean.float(), (centred.pow(2).mean(0) + ridge).sqrt().float())
    if d > MAX_FULL_COVARIANCE_DIM:
        raise ModelError(f"corrector.covariance=full needs a {d}×{d} matrix for latents of {d} elements; "
                         f"use corrector.covariance=diagonal (full is for up to {MAX_FULL_COVARIANCE_DIM})")
    cov = centred.T @ centred / n + ridge * torch.eye(d, dtype=torch.float64)
    return GaussianFit(mean.float(), torch.linalg.cholesky(cov).float())


def corrector_network(shape: tuple[int, ...], channels: list[int], layers_per_block: int):
    """The flow corrector's velocity network: an unconditional UNet2DModel on latents of `shape`."""
    import diffusers

    c, h, w = shape
    net = diffusers.UNet2DModel(
        sample_size=(h, w), in_channels=c, out_channels=c, block_out_channels=tuple(channels),
        layers_per_block=layers_per_block, down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=math.gcd(*channels, 8),
    )
    with torch.no_grad():  # a zero residual: the untrained corrector is exactly the Gaussian one
        net.conv_out.weight.zero_()
        net.conv_out.bias.zero_()
    return net


def gaussian_path_variance(s: torch.Tensor) -> torch.Tensor:
    """f(s) = (1 − s)² + s²: the variance of x_s = (1 − s)·u + s·ε for independent whitened u, ε."""
    return (1 - s) ** 2 + s ** 2


def gaussian_velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[ε − u | x_s = x] when u and ε are independent N(0, I): (2s − 1)/f(s)·x."""
    s = s.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return (2 * s - 1) / gaussian_path_variance(s) * x


def gaussian_step_gain(s_from: torch.Tensor, s_to: torch.Tensor) -> torch.Tensor:
    """The exact solution of dx/ds = v_G(x, s) from s_from to s_to scales x by √(f(s_to)/f(s_from))."""
    return (gaussian_path_variance(s_to) / gaussian_path_variance(s_from)).sqrt()


def euler_gaussian_gain(steps: int) -> float:
    """How much `steps` plain Euler steps of v_G from s = 1 to 0 scale x (exact flow: 1)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    gain = 1.0
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        gain *= float(1 + (s_next - s) * (2 * s - 1) / gaussian_path_variance(s))
    return gain


def corrector_grid(steps: int, num_train_timesteps: int = 1000) -> EulerGrid:
    """The corrector's own sampler: `steps` uniform Euler steps from σ = 1 to 0."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return EulerGrid(sigmas=sigmas, timesteps=sigmas[:-1] * num_train_timesteps)


def residual_training_pair(u: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                           num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_s, target of the residual network) for whitened data u, noise ε and timestep input
    1000·s: the rectified-flow target ε − u less v_G(x_s, s)."""
    s = timesteps.to(u.dtype) / num_train_timesteps
    x_s, target = rectified_flow_pair(u, noise, s)
    return x_s, target - gaussian_velocity(x_s, s)


def minibatch_ot_pairs(noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The data order that pairs each noise with a data point by exact optimal transport
    (squared Euclidean cost) within the batch: minibatch OT coupling (Tong et al. 2023).

    Rectified flow on independently drawn pairs learns E[ε − u | x_s], whose few-step Euler
    samples collapse towards the mean (one step from ε gives E[u] exactly). Pairs that are
    close make the paths nearly straight, so a corrector of a few Euler steps keeps the
    variance of its data."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(noise.flatten(1).double(), data.flatten(1).double()).pow(2)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = torch.empty(len(rows), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return order.to(data.device)


def sample_residual_flow(net, noise: torch.Tensor, grid: EulerGrid) -> torch.Tensor:
    """From ε at σ = 1 to σ = 0: the Gaussian velocity integrated exactly, the network's residual
    by Euler steps (exponential-integrator style)."""
    x = noise
    for k in range(grid.steps):
        s, s_next = grid.sigmas[k], grid.sigmas[k + 1]
        residual = net(x, grid.timesteps[k].expand(len(x)).to(x.device)).sample
        x = gaussian_step_gain(s, s_next).to(x.dtype) * x + (s_next - s).to(x.dtype) * residual
    return x


class NoiseCorrector:
    """ε → z for a base flow model; `card` says what it was fitted for."""

    def __init__(self, card: dict, fit: GaussianFit, net=None):
        self.card, self.fit, self.net = card, fit, net
        self.grid = corrector_grid(int(card["sampling_steps"])) if net is not None else None

    @torch.no_grad()
    def correct(self, noise: torch.Tensor) -> torch.Tensor:
        u = noise.float()
        if self.net is not None:
            param = next(self.net.parameters())
            u = sample_residual_flow(self.net, u.to(param.device, param.dtype), self.grid).float().cpu()
        return self.fit.color(u)

    def to(self, device) -> "NoiseCorrector":
        if self.net is not None:
            self.net.to(device)
        return self

    @property
    def parameters(self) -> int:
        net = sum(p.numel() for p in self.net.parameters()) if self.net is not None else 0
        return net + self.fit.parameters

    def flops_per_sample(self) -> int:
        """Floating-point operations per corrected noise: the network's forward (counted by
        torch's FLOP counter, 2 per multiply-add) times its steps, plus z = μ + L·u."""
        total = self.fit.flops_per_sample()
        if self.net is not None:
            shape, device = tuple(self.card["latent_shape"]), next(self.net.parameters()).device
            forward = lambda x: self.net(x, torch.zeros(1, device=device)).sample  # noqa: E731
            total += network_flops(forward, shape, device) * self.grid.steps
        return total


def network_flops(forward, shape: tuple[int, ...], device="cpu") -> int:
    """FLOPs of one forward on a batch of one latent of `shape` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward(torch.zeros(1, *shape, device=device))
    return int(counter.get_total_flops())


def base_weights_digest(folder: str | Path) -> str:
    """sha256 of the base denoiser's weights (every .safetensors under unet/ or transformer/ of
    a local model folder): the base's identity whatever its location or file dates."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(f for sub in ("unet", "transformer") for f in (Path(folder) / sub).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no unet/ or transformer/ weights (.safetensors) to identify the base model by")
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def corrector_card(kind: str, base_model: str, base_weights: str, num_inference_steps: int, latent_shape: list[int],
                   guidance_scale: float, inversion: str, samples: int, sampling_steps: int, covariance: str) -> dict:
    return {
        "kind": kind, "base_model": base_model, "base_weights": base_weights, "num_inference_steps": num_inference_steps,
        "latent_shape": list(latent_shape), "guidance_scale": guidance_scale, "inversion": inversion,
        "samples": samples, "sampling_steps": sampling_steps if kind == "flow" else 0, "covariance": covariance,
        "usage": "ε ~ N(0, I) → (flow: sampling_steps steps: exact Gaussian velocity + Euler on the residual of "
             "unet/) → u → z = mean + scale·u → base flow",
    }


def save_corrector(folder: Path, card: dict, fit: GaussianFit, net=None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"mean": fit.mean.contiguous(), "scale": fit.scale.contiguous()}, folder / GAUSSIAN_FILE)
    if net is not None:
        net.save_pretrained(folder / NETWORK_DIR)
    (folder / contract.CORRECTOR_CARD).write_text(json.dumps(card, indent=1))


def read_card(ref: str) -> dict:
    """The card of the corrector at `ref`, read without fetching the corrector."""
    if not model_file_exists(ref, contract.CORRECTOR_CARD):
        raise ModelError(f"model.noise_corrector {ref!r} is not a noise corrector folder (no {contract.CORRECTOR_CARD}); "
                         "fit one with `pgraft train-corrector`")
    if is_remote(ref):
        return json.loads(open_storage(ref).get_bytes(contract.CORRECTOR_CARD))
    return json.loads((local_folder(ref) / contract.CORRECTOR_CARD).read_text())


def check_card(card: dict, ref: str, base_path: str, num_inference_steps: int, latent_shape: tuple[int, ...] | None,
               base_folder: str | Path | None = None) -> None:
    """One-line errors for a corrector put in front of a base it was not fitted for. The base's
    weights are compared when its local folder is given (in a worker, after the fetch)."""
    if base_folder is not None and card.get("base_weights") != base_weights_digest(base_folder):
        raise ModelError(f"model.noise_corrector {ref!r} was fitted for the base model {card['base_model']!r}, not "
                         f"model.path {base_path!r} (their weights differ); fit a corrector for this base")
    if card["num_inference_steps"] != num_inference_steps:
        raise ModelError(f"model.noise_corrector {ref!r} was fitted to inversions with {card['num_inference_steps']} "
                         f"Euler steps; model.num_inference_steps is {num_inference_steps}")
    if latent_shape is not None and tuple(card["latent_shape"]) != tuple(latent_shape):
        raise ModelError(f"model.noise_corrector {ref!r} makes latents of shape {tuple(card['latent_shape'])}; the "
                         f"model takes {tuple(latent_shape)}")


def load_corrector(ref: str) -> NoiseCorrector:
    """The corrector at `ref` (a local folder or a storage location, fetched once per node)."""
    import diffusers
    from safetensors.torch import load_file

    read_card(ref)  # one line naming the reference when it is not a corrector
    path = Path(fetch_model(ref))
    card = json.loads((path / contract.CORRECTOR_CARD).read_text())
    tensors = load_file(path / GAUSSIAN_FILE)
    net = None
    if card["kind"] == "flow":
        net = diffusers.UNet2DModel.from_pretrained(path / NETWORK_DIR).eval()
    return NoiseCorrector(card, GaussianFit(tensors["mean"], tensors["scale"]), net)
