"""Capture correctness: the latent stored as x_k equals what a hand-written loop over the same
scheduler and model reaches after k steps (DDIM digits, SD tiny ε and v, flow digits, SD3 tiny)."""

from __future__ import annotations

import pytest
import torch

from pgraft import contract
from pgraft.config import ModelSection
from pgraft.models.adapters import ModelError, copy_to_host, initial_noise, load_adapter

CAPTURE = [1, 5, 9]
STEPS = 10


def _assert_captured(rollout, hand: dict[int, torch.Tensor]):
    for k, expected in hand.items():
        name = contract.FINAL_LATENT if k == STEPS else contract.latent_name(k)
        torch.testing.assert_close(rollout.latents[name], expected, rtol=0, atol=1e-5, msg=f"latent after step {k}")


def test_class_unet_ddim_capture_matches_hand_loop(tiny_digits):
    adapter = load_adapter(ModelSection(path=str(tiny_digits), num_inference_steps=STEPS, guidance_scale=0.7, device="cpu"))
    prompts, seeds = ["a handwritten digit 3", "a handwritten digit 7"], [11, 12]
    rollout = adapter.rollout(prompts, seeds, CAPTURE)

    unet, sched = adapter.pipe.unet, adapter.pipe.scheduler
    x = initial_noise(seeds, (1, 8, 8))
    labels, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    hand = {}
    with torch.no_grad():
        sched.set_timesteps(STEPS)
        for i, t in enumerate(sched.timesteps):
            cond = unet(x, t, class_labels=labels).sample
            uncond = unet(x, t, class_labels=null).sample
            x = sched.step(uncond + 0.7 * (cond - uncond), t, x).prev_sample
            hand[i + 1] = x.clone()
    _assert_captured(rollout, {k: hand[k] for k in CAPTURE + [STEPS]})
    torch.testing.assert_close(rollout.latents[contract.INITIAL_NOISE], initial_noise(seeds, (1, 8, 8)))
    assert list(rollout.latents) == ["x_T", "x_1", "x_5", "x_9", "x_0"]
    # DDIM `leading` at 10 of 1000 visits 900, 800, …, 0; x_k sits at timesteps[k].
    assert rollout.captured_timesteps == {"x_1": 800, "x_5": 400, "x_9": 0}
    assert rollout.samples.shape == (2, 8, 8) and rollout.samples.dtype.name == "uint8"


def test_flow_capture_matches_euler_closed_form(tiny_digits_flow):
    """Flow: x_{k+1} = x_k + (σ_{k+1} − σ_k)·v, written out by hand (no scheduler.step)."""
    adapter = load_adapter(ModelSection(path=str(tiny_digits_flow), num_inference_steps=STEPS, guidance_scale=1.0, device="cpu"))
    seeds = [5, 6, 7]
    rollout = adapter.rollout(["a handwritten digit 1"] * 3, seeds, CAPTURE)
    sched = adapter.pipe.scheduler
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas
    x = initial_noise(seeds, (1, 8, 8))
    hand = {}
    with torch.no_grad():
        for i in range(STEPS):
            v = adapter.pipe.unet(x, sigmas[i] * 1000, class_labels=torch.tensor([1, 1, 1])).sample
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            hand[i + 1] = x.clone()
    _assert_captured(rollout, {k: hand[k] for k in CAPTURE + [STEPS]})
    assert rollout.scheduler == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stable_diffusion_capture_matches_hand_loop(tiny_sd_factory, prediction_type):
    path = tiny_sd_factory(prediction_type)
    adapter = load_adapter(ModelSection(kind="stable_diffusion", path=str(path), num_inference_steps=STEPS,
                                        guidance_scale=3.0, device="cpu"))
    prompts, seeds = ["a red cat", "a blue dog"], [1, 2]
    rollout = adapter.rollout(prompts, seeds, CAPTURE)
    pipe = adapter.pipe
    assert pipe.scheduler.config.prediction_type == prediction_type
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
        x = initial_noise(seeds, (4, 8, 8)) * pipe.scheduler.init_noise_sigma
        pipe.scheduler.set_timesteps(STEPS)
        hand = {}
        for i, t in enumerate(pipe.scheduler.timesteps):
            model_in = pipe.scheduler.scale_model_input(torch.cat([x, x]), t)
            out = pipe.unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_uncond, out_cond = out.chunk(2)
            x = pipe.scheduler.step(out_uncond + 3.0 * (out_cond - out_uncond), t, x).prev_sample
            hand[i + 1] = x.clone()
    _assert_captured(rollout, {k: hand[k] for k in CAPTURE + [STEPS]})
    assert rollout.samples.shape == (2, 16, 16, 3)


def test_sd3_flow_capture_matches_euler_closed_form(tiny_sd3):
    adapter = load_adapter(ModelSection(kind="sd3", path=str(tiny_sd3), num_inference_steps=STEPS,
                                        guidance_scale=2.0, device="cpu"))
    prompts, seeds = ["a small house"], [3]
    rollout = adapter.rollout(prompts, seeds, CAPTURE)
    pipe = adapter.pipe
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(prompts, prompts, None, device="cpu",
                                                                 do_classifier_free_guidance=True)
        x = initial_noise(seeds, (4, 8, 8))
        pipe.scheduler.set_timesteps(STEPS)
        sigmas = pipe.scheduler.sigmas
        hand = {}
        for i, t in enumerate(pipe.scheduler.timesteps):
            out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                                   encoder_hidden_states=torch.cat([uncond, cond]),
                                   pooled_projections=torch.cat([pooled_uncond, pooled])).sample
            v_uncond, v_cond = out.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + 2.0 * (v_cond - v_uncond))
            hand[i + 1] = x.clone()
    _assert_captured(rollout, {k: hand[k] for k in CAPTURE + [STEPS]})


def test_same_seed_same_rollout_regardless_of_batch(tiny_digits):
    adapter = load_adapter(ModelSection(path=str(tiny_digits), num_inference_steps=STEPS, device="cpu"))
    alone = adapter.rollout(["a handwritten digit 2"], [99], [5])
    together = adapter.rollout(["a handwritten digit 2", "a handwritten digit 4"], [99, 100], [5])
    torch.testing.assert_close(alone.latents["x_T"][0], together.latents["x_T"][0], rtol=0, atol=0)
    torch.testing.assert_close(alone.latents["x_0"][0], together.latents["x_0"][0], rtol=0, atol=1e-5)


def test_copy_to_host_on_cpu_is_an_equal_float32_copy_not_a_view():
    latents = torch.randn(2, 1, 8, 8)
    host, copied = copy_to_host(latents)
    assert copied is None and host.dtype == torch.float32 and torch.equal(host, latents)
    expected = latents.clone()
    latents.mul_(0.5)  # a sampler updating its latents in place after the capture
    assert torch.equal(host, expected)
    half = torch.randn(3, 4).to(torch.bfloat16)
    assert torch.equal(copy_to_host(half)[0], half.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copy_to_host_on_cuda_lands_in_pinned_memory_once_its_event_is_done():
    latents = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.bfloat16)
    host, copied = copy_to_host(latents)
    copied.synchronize()
    assert host.is_pinned() and host.device.type == "cpu" and torch.equal(host, latents.float().cpu())


def test_bad_model_inputs_are_named(tiny_digits, tmp_path):
    with pytest.raises(ModelError, match="model.path .* does not exist"):
        load_adapter(ModelSection(path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="no model_index.json"):
        load_adapter(ModelSection(kind="stable_diffusion", path=str(tiny_digits)))
    adapter = load_adapter(ModelSection(path=str(tiny_digits), num_inference_steps=STEPS, device="cpu"))
    with pytest.raises(ModelError, match=r"capture_steps: \[10\] out of range"):
        adapter.rollout(["a handwritten digit 1"], [0], [10])
    with pytest.raises(ModelError, match="prompt 'a cat' is not one the model"):
        adapter.rollout(["a cat"], [0], [1])


def test_composite_runs_finetuned_then_base(tiny_digits, tmp_path):
    """model.finetuned: the tuned UNet for steps 0..k-1, the base for the rest, exactly."""
    import json

    from tiny_models import save_tiny_digits

    other = save_tiny_digits(tmp_path / "other", "ddpm", seed=1)  # stands in for a fine-tuned UNet
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "unet").symlink_to(other / "unet")
    (folder / "composite.json").write_text(json.dumps({"kind": "class_unet", "finetuned": "full", "switch_step": 4,
                                                       "num_inference_steps": STEPS, "base_model": str(tiny_digits)}))
    model = ModelSection(path=str(tiny_digits), num_inference_steps=STEPS, guidance_scale=1.0, device="cpu",
                         finetuned=str(folder))
    rollout = load_adapter(model).rollout(["a handwritten digit 5"], [8], [4, 6])

    base = load_adapter(model.model_copy(update={"finetuned": None}))
    tuned = load_adapter(ModelSection(path=str(other), num_inference_steps=STEPS, device="cpu")).pipe.unet
    sched = base.pipe.scheduler
    sched.set_timesteps(STEPS)
    x = initial_noise([8], (1, 8, 8))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            net = tuned if i < 4 else base.pipe.unet
            x = sched.step(net(x, t, class_labels=torch.tensor([5])).sample, t, x).prev_sample
            if i + 1 == 4:
                torch.testing.assert_close(rollout.latents["x_4"], x, rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout.latents["x_0"], x, rtol=0, atol=1e-5)
    with pytest.raises(ModelError, match="trained for 10 sampler steps; model.num_inference_steps is 12"):
        load_adapter(model.model_copy(update={"num_inference_steps": 12}))


def test_sd2_lora_composite_at_t_matches_a_step_by_step_reference(tiny_sd_factory, tmp_path):
    """The t2i recipe's sampler (configs/sd2-vqascore.yaml: DDIM leading, guidance, a LoRA
    composite switching at step k): LoRA UNet with guidance for steps 1..k, the base UNet after,
    against a hand loop over two separately loaded networks."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from pgraft.models.lora import inject_lora, load_lora, lora_state_dict

    path, switch, targets = tiny_sd_factory("v_prediction"), 6, ["to_q", "to_k", "to_v", "to_out.0"]
    tuned = inject_lora(UNet2DConditionModel.from_pretrained(path / "unet"), 2, targets)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, weight in tuned.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (no change): make the adapter change the output
                weight.normal_(0, 0.5)
    folder = tmp_path / "model"
    (folder / "lora").mkdir(parents=True)
    save_file(lora_state_dict(tuned), folder / "lora" / "adapter.safetensors")
    (folder / "lora" / "config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": targets}))
    (folder / "composite.json").write_text(json.dumps({"kind": "stable_diffusion", "finetuned": "lora",
                                                       "switch_step": switch, "num_inference_steps": STEPS,
                                                       "base_model": str(path)}))
    model = ModelSection(kind="stable_diffusion", path=str(path), scheduler="ddim", timestep_spacing="leading",
                         num_inference_steps=STEPS, guidance_scale=7.5, device="cpu", finetuned=str(folder))
    adapter = load_adapter(model)
    prompts, seeds = ["a red apple", "two cats"], [5, 6]
    rollout = adapter.rollout(prompts, seeds, [switch])
    # t of the chosen step: DDIM leading 10/1000 with steps_offset 1 visits 901, 801, …; x_6 is at t = 301.
    assert rollout.captured_timesteps[f"x_{switch}"] == 301

    base = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    reference = inject_lora(UNet2DConditionModel.from_pretrained(path / "unet"), 2, targets, init=False).eval()
    load_lora(reference, lora_state_dict(tuned))
    pipe = adapter.pipe
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
        x = initial_noise(seeds, (4, 8, 8)) * pipe.scheduler.init_noise_sigma
        pipe.scheduler.set_timesteps(STEPS)
        for i, t in enumerate(pipe.scheduler.timesteps):
            net = reference if i < switch else base
            out = net(pipe.scheduler.scale_model_input(torch.cat([x, x]), t), t,
                      encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_uncond, out_cond = out.chunk(2)
            x = pipe.scheduler.step(out_uncond + 7.5 * (out_cond - out_uncond), t, x).prev_sample
            if i + 1 == switch:
                torch.testing.assert_close(rollout.latents[f"x_{switch}"], x, rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout.latents[contract.FINAL_LATENT], x, rtol=0, atol=1e-5)
    plain = load_adapter(model.model_copy(update={"finetuned": None})).rollout(prompts, seeds, [switch])
    assert (plain.latents[contract.FINAL_LATENT] - x).abs().max() > 1e-3  # the adapter did change the samples
