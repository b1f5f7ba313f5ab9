"""A class-conditional transformer denoiser over a sequence of continuous token vectors.

It is a diffusers `ModelMixin` with the `UNet2DModel` calling convention
(`net(sample, timestep, class_labels=…).sample`), so the class-conditional pipeline, the
adapter's X_t capture, the composite sampler and the train stage drive it as they drive the
digits UNet; `save_pretrained` / `from_pretrained` give it the same folder layout. A sample is
(sample_length, embed_dim): one embedded token per position (the molecules task embeds SELFIES
tokens; pgraft/tasks/molecules.py). The condition is one class per sample, or one per position
(the layout task's element classes; pgraft/tasks/layout/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class SequenceDenoiserOutput(BaseOutput):
    sample: torch.Tensor  # (B, sample_length, embed_dim): the prediction (ε, v or velocity, as trained)


class SequenceDenoiser(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, sample_length: int = 32, embed_dim: int = 16, width: int = 128, layers: int = 4,
                 heads: int = 4, num_class_embeds: int = 2):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, width)
        self.position = nn.Parameter(torch.randn(1, sample_length, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.class_embedding = nn.Embedding(num_class_embeds, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, embed_dim)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """The shape of one sample (what x_T is drawn in)."""
        return (self.config.sample_length, self.config.embed_dim)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(batch) if t.ndim == 0 else t
        emb = self.time_mlp(get_timestep_embedding(t.float(), self.config.width, flip_sin_to_cos=True,
                                                   downscale_freq_shift=0).to(sample.dtype))
        per_position = class_labels is not None and class_labels.ndim == 2  # a layout's element classes
        if class_labels is not None and not per_position:  # one class per sample
            emb = emb + self.class_embedding(class_labels.to(sample.device))
        h = self.in_proj(sample) + self.position + emb[:, None, :]
        if per_position:
            h = h + self.class_embedding(class_labels.to(sample.device))
        out = self.out_proj(self.norm_out(self.encoder(h)))
        return SequenceDenoiserOutput(sample=out) if return_dict else (out,)
