"""The trainable network with its conditioning, one forward for every model kind.

The adapter says how to condition its network (`training_condition`, `denoise`), so this
module never reaches into a pipeline's components."""

from __future__ import annotations

import torch

from pgraft import targets


class Denoiser(torch.nn.Module):
    """`net` plus the condition of every prompt and the null condition (prompt dropout)."""

    def __init__(self, adapter, prompts: list[str]):
        super().__init__()
        self.adapter = adapter  # not a module: only its `denoise` is called
        self.net = adapter.denoiser
        self.unique_prompts = sorted(set(prompts))
        self.prompt_index = {p: i for i, p in enumerate(self.unique_prompts)}
        cond, null = adapter.training_condition(self.unique_prompts)
        self.register_buffer("cond", cond)
        self.register_buffer("null", null)

    def forward(self, x_s: torch.Tensor, timesteps: torch.Tensor, prompt_idx: torch.Tensor, drop: torch.Tensor):
        cond = self.cond[prompt_idx]
        mask = drop.view(-1, *([1] * (cond.dim() - 1)))
        cond = torch.where(mask, self.null.expand_as(cond), cond)
        return self.adapter.denoise(self.net, x_s, timesteps, cond)


def path_of(scheduler):
    """(coefficient function over timesteps, prediction type) for the sampler's Gaussian path."""
    if "FlowMatch" in type(scheduler).__name__:
        return (lambda ts: targets.flow_coefficients(ts, scheduler.config.num_train_timesteps)), "flow"
    return (lambda ts: targets.ddpm_coefficients(scheduler.alphas_cumprod, ts)), scheduler.config.prediction_type


def trainable_parameters(net, mode: str, lora_rank: int, lora_targets: list[str]):
    """The parameters the optimizer updates: all of them, or a freshly injected LoRA's."""
    from stages.train.errors import TrainError

    if mode == "lora":
        from pgraft.models.lora import inject_lora

        net.requires_grad_(False)
        try:
            inject_lora(net, lora_rank, lora_targets)
        except ValueError as exc:
            raise TrainError(f"train.lora_targets={lora_targets}: {exc}") from None
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"no trainable parameters (train.lora_targets={lora_targets} matched nothing?)")
    return params
