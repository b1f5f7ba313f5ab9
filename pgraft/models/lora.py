"""LoRA on any diffusers denoiser through peft's model-agnostic injection (UNet2DModel has no
`add_adapter`), saved as plain safetensors of the `lora_` weights."""

from __future__ import annotations

import torch


def inject_lora(net: torch.nn.Module, rank: int, targets: list[str], alpha: int | None = None,
                init: str | bool = "gaussian") -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=init)
    return inject_adapter_in_model(config, net)


def lora_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items() if "lora_" in k}


def load_lora(net: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    result = net.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"LoRA weights do not fit the model: {result.unexpected_keys[:3]}")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"LoRA weights lack {missing[:3]}")


def set_lora_enabled(net: torch.nn.Module, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in net.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)
