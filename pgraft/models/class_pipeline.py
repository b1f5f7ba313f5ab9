"""A diffusers pipeline for class-conditional denoisers: `UNet2DModel`s (the digits task) and
the sequence transformer of pgraft/models/sequence.py (the molecules task).

It follows the conventions of diffusers' text-to-image pipelines — `latents=`, `generator=`,
`callback_on_step_end`, `output_type` — so one adapter captures latents from every kind of
model the same way. Classifier-free guidance uses a reserved null class.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline


def latents_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model space [-1, 1] → uint8 images, HxW for one channel, HxWxC otherwise."""
    img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    img = np.transpose(img, (0, 2, 3, 1))
    return img[..., 0] if img.shape[-1] == 1 else img


def sample_shape(net) -> tuple[int, ...]:
    """One sample's shape for a denoiser: its own `latent_shape`, else a square UNet's (C, H, W)."""
    shape = getattr(net, "latent_shape", None)
    if shape is not None:
        return tuple(shape)
    return (net.config.in_channels, net.config.sample_size, net.config.sample_size)


class ClassConditionalPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def predict(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor, null_class: int, guidance_scale: float) -> torch.Tensor:
        """One guided model call: uncond + g·(cond − uncond); g = 1 is the conditional model alone."""
        t_batch = t.expand(x.shape[0]) if t.ndim == 0 else t
        # The null class alone (unconditional sampling) needs one network call, not two.
        if guidance_scale == 1.0 or bool((class_labels == null_class).all()):
            return self.unet(x, t_batch, class_labels=class_labels).sample
        labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)])
        out = self.unet(torch.cat([x, x]), torch.cat([t_batch, t_batch]), class_labels=labels).sample
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: torch.Tensor,
        null_class: int,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        latents: torch.Tensor | None = None,
        generator: list[torch.Generator] | torch.Generator | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
    ):
        device = self.unet.device
        dtype = self.unet.dtype
        batch = class_labels.shape[0]
        if latents is None:
            gens = generator if isinstance(generator, list) else [generator] * batch
            latents = torch.stack([torch.randn(sample_shape(self.unet), generator=g) for g in gens])
        latents = latents.to(device, dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        class_labels = class_labels.to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Stochastic samplers (DDPM) draw their step noise from the per-sample generators too.
        step_kwargs = {"generator": generator} if generator is not None else {}
        for i, t in enumerate(self.scheduler.timesteps):
            # Flow-matching schedulers have no input scaling.
            scale_input = getattr(self.scheduler, "scale_model_input", None)
            model_in = scale_input(latents, t) if scale_input else latents
            out = self.predict(model_in, t, class_labels, null_class, guidance_scale)
            latents = self.scheduler.step(out, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {"latents": latents})
                latents = returned.pop("latents", latents)
        if output_type == "latent":
            return latents
        return latents_to_uint8(latents)
