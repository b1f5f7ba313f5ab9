"""Export a trained network as train/<name>/model/: fine-tuned weights (full UNet folder or
LoRA safetensors) and the composite sampler's card, which the next round's sampler loads."""

from __future__ import annotations

import json

from pgraft import contract
from pgraft.config import Config
from pgraft.storage import Storage, staged_folder


def export_model(net, cfg: Config, storage: Storage, prefix: str, card: dict, rank: int) -> str:
    """Write `net` and `card` to `prefix` (rank 0; ZeRO-3 parameters gathered on every rank
    first). Returns the model's location."""
    import deepspeed
    from safetensors.torch import save_file

    with deepspeed.zero.GatheredParameters(list(net.parameters()), enabled=cfg.train.zero_stage == 3):
        if rank != 0:
            return storage.url(prefix)
        with staged_folder(storage, prefix) as folder:
            if cfg.train.mode == "lora":
                from pgraft.models.lora import lora_state_dict

                (folder / "lora").mkdir(parents=True, exist_ok=True)
                save_file(lora_state_dict(net), folder / "lora" / "adapter.safetensors")
                (folder / "lora" / "config.json").write_text(json.dumps(
                    {"r": cfg.train.lora_rank, "lora_alpha": cfg.train.lora_rank, "target_modules": cfg.train.lora_targets}))
            else:
                net.save_pretrained(folder / "unet")
            (folder / contract.COMPOSITE_CARD).write_text(json.dumps(card, indent=1))
    return storage.url(prefix)
