"""Tiny models built from configs, saved with `save_pretrained`, loaded back through the real
code path. Random weights: the tests check plumbing and numerics, not sample quality."""

from __future__ import annotations

import string
from pathlib import Path

import torch


def tiny_clip_tokenizer(max_length: int = 16):
    """A character-level CLIP BPE tokenizer from an in-memory vocab (no merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + "!?.,'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def save_tiny_digits(out: Path, kind: str = "ddpm", seed: int = 0) -> Path:
    """A randomly initialised digits base (small UNet) with the real model card and scheduler."""
    import diffusers

    from pgraft.tasks import digits

    torch.manual_seed(seed)
    cfg = digits.unet_config() | dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    unet = diffusers.UNet2DModel(**cfg)
    if kind == "ddpm":
        train = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        sampler = diffusers.DDIMScheduler.from_config(train.config, timestep_spacing="leading")
    else:
        sampler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    digits.save_base(unet, sampler, out, kind)
    return out


def save_tiny_sd(out: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                                intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                                vocab_size=100, max_position_embeddings=16))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def save_tiny_sd3(out: Path, seed: int = 0) -> Path:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4)
    clip_cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                    num_attention_heads=4, num_hidden_layers=2, vocab_size=100, max_position_embeddings=16,
                    hidden_act="gelu", projection_dim=32)
    vae = AutoencoderKL(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(out)
    return out


def save_tiny_clip(out: Path, seed: int = 0) -> Path:
    """CLIPModel + tokenizer + image processor, all tiny, in one folder (as on the hub)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=16, patch_size=4),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out)
    tiny_clip_tokenizer().save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(out)
    return out


def save_tiny_molecules(out: Path, seed: int = 0) -> Path:
    """A randomly initialised molecules base (one narrow transformer layer) with the real model card."""
    import diffusers

    from pgraft.models.sequence import SequenceDenoiser
    from pgraft.tasks import molecules

    torch.manual_seed(seed)
    net = SequenceDenoiser(**molecules.denoiser_config(width=16, layers=1))
    train = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    molecules.save_base(net, diffusers.DDIMScheduler.from_config(train.config, timestep_spacing="leading"), out / "ddpm")
    return out / "ddpm"


# A LLaVA-style chat template: the user turn holds the image and the question, the generation
# prompt opens the assistant's turn, so the next token is the answer.
VLM_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                     "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
                     "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_vlm_tokenizer(whole_answers: bool = True):
    """A character-level BPE tokenizer built in memory; with `whole_answers` its merges keep
    "Yes" and "No" as one token each (as real VLM tokenizers do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    chars = sorted(set(string.printable) - set(string.whitespace))
    words = ["Ye", "Yes", "No"] if whole_answers else []
    vocab = {token: i for i, token in enumerate(specials + chars + words)}
    merges = [("Y", "e"), ("Ye", "s"), ("N", "o")] if whole_answers else []
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def save_llava(out: Path, vision: dict, text: dict, image_size: int, patch_size: int, seed: int = 0,
               whole_answers: bool = True) -> Path:
    """A LLaVA-style image-text-to-text model with random weights: a CLIP vision tower (`vision`:
    CLIPVisionConfig sizes), a Llama (`text`: LlamaConfig sizes), the in-memory tokenizer and a chat
    template, saved as a hub folder (model, processor, tokenizer)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_vlm_tokenizer(whole_answers)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(**{"vocab_size": len(tokenizer), **text}, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
    )
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                  crop_size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=VLM_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


def save_tiny_vlm(out: Path, seed: int = 0, whole_answers: bool = True) -> Path:
    """A tiny LLaVA-style VLM: a 1-layer CLIP vision tower on 16 px images, a 2-layer Llama."""
    return save_llava(out, dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                projection_dim=16),
                      dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=2, max_position_embeddings=512),
                      image_size=16, patch_size=8, seed=seed, whole_answers=whole_answers)


def save_tiny_layout(out: Path, seed: int = 0) -> Path:
    """A randomly initialised layout base (one narrow transformer layer) with the real model card,
    and a random layout encoder beside it, as `pgraft pretrain layout` lays them out (no corpus)."""
    import diffusers

    from pgraft.models.sequence import SequenceDenoiser
    from pgraft.tasks.layout import task

    torch.manual_seed(seed)
    net = SequenceDenoiser(**task.denoiser_config(width=16, layers=1))
    train = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                    clip_sample=False)
    task.save_base(net, diffusers.DDIMScheduler.from_config(train.config, timestep_spacing="leading"), out / "ddpm",
                   ["title text", "text text figure"])
    SequenceDenoiser(**task.encoder_config(width=16, layers=1)).save_pretrained(out / "encoder")
    return out
