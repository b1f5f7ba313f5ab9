"""One interface over diffusers models: roll out a batch from given seeds, capture x_T, the
latents after the configured step indices and x_0, and decode the final image.

Capture rides on diffusers' `callback_on_step_end`, so the rollout *is* the pipeline call:
the latent named `x_k` is the one the pipeline holds after k sampler steps, at noise level
`scheduler.timesteps[k]` (DDIM `leading` 20/1000: step 15 → t = 200).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pgraft import contract
from pgraft.config import ModelSection
from pgraft.contract import COMPOSITE_CARD
from pgraft.models.fetch import ModelError, fetch_model, is_remote, local_folder, model_file_exists
from pgraft.storage import open_storage

MODEL_CARD = "pgraft_model.json"  # class-conditional folders: prompt → class map, null class, task


@dataclass
class Rollout:
    latents: dict[str, torch.Tensor]  # name -> (B, ...) float32 on CPU
    samples: np.ndarray | list  # decoded samples of `sample_kind`: uint8 (B, H, W) / (B, H, W, 3) images, SMILES, …
    captured_timesteps: dict[str, int]  # latent name -> scheduler timestep of that latent
    timesteps: list[float]  # every timestep the sampler visited
    scheduler: str
    sample_kind: str = "image"  # pgraft.samples kind of `samples`


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """x_T per sample from its own seed, drawn on the CPU so every device sees the same noise."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def copy_to_host(latents: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A float32 CPU copy of `latents`, and on CUDA the event to wait on before reading it.

    `.cpu()` of a CUDA tensor makes the host wait until the device has run every queued
    kernel; done at each captured step, it stops the host from queueing the next steps and
    the device idles. So on CUDA the copy goes into pinned memory with `non_blocking=True`
    (asynchronous only into pinned memory) and an event recorded after it says when it has
    landed: the caller waits on it once, after the rollout. On the CPU it is a plain copy,
    never a view, because a sampler may update its latents in place after the capture."""
    source = latents.detach()
    if source.device.type != "cuda":
        return source.to(torch.float32, copy=True), None
    host = torch.empty(source.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(source.float(), non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(source.device))  # the stream the copy went on, on cuda:N too
    return host, copied


def synchronize(device: torch.device) -> None:
    """Wait until `device` has run all queued work (a no-op off CUDA), so host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_generators(seeds: list[int]) -> list[torch.Generator]:
    # A stream distinct from the initial noise, for stochastic samplers' per-step noise.
    return [torch.Generator().manual_seed((s + 0x9E3779B97F4A7C15) % (1 << 63)) for s in seeds]


def _scheduler_for(current, model: ModelSection):
    import diffusers

    classes = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler,
               "flow_euler": diffusers.FlowMatchEulerDiscreteScheduler}
    overrides = {} if model.timestep_spacing == "folder" else {"timestep_spacing": model.timestep_spacing}
    cls = type(current) if model.scheduler == "folder" else classes[model.scheduler]
    if cls is type(current) and not overrides:
        return current
    return cls.from_config(current.config, **overrides)


def noise_level_after(scheduler, timesteps: list[float], k: int) -> int:
    """The training timestep whose noise level x_k has, after k sampler steps.

    Flow schedulers move to σ_k, i.e. timesteps[k]. DDIM/DDPM step from t to t − T/N, which
    equals timesteps[k] for `leading` spacing but not for every `linspace`/`trailing` one."""
    if "FlowMatch" in type(scheduler).__name__:
        return int(round(timesteps[k]))
    return int(round(timesteps[k - 1])) - scheduler.config.num_train_timesteps // len(timesteps)


def check_capture_steps(steps: list[int], num_inference_steps: int) -> None:
    bad = [k for k in steps if not 1 <= k < num_inference_steps]
    if bad:
        raise ModelError(
            f"generate.capture_steps: {bad} out of range; step indices must lie in 1..{num_inference_steps - 1} "
            f"(model.num_inference_steps = {num_inference_steps}; x_T and x_0 are always stored)"
        )


class ModelAdapter:
    """Base: subclasses build `self.pipe` and say how to call it for a batch."""

    kind: str = ""
    denoiser_name = "unet"  # the pipeline attribute holding the network the train stage tunes
    scales_initial_noise = True  # the pipeline multiplies given latents by init_noise_sigma
    sample_kind = "image"  # what `_call_pipeline` decodes x_0 into (pgraft.samples)

    def __init__(self, model: ModelSection):
        self.config = model
        check_model_folder(model)
        self.path = Path(fetch_model(model.path))  # this node's copy when the model is in storage
        self.device = resolve_device(model.device)
        self.dtype = getattr(torch, model.dtype)
        self.pipe = self._load()
        self.pipe.scheduler = _scheduler_for(self.pipe.scheduler, model)
        self.pipe.set_progress_bar_config(disable=True)
        # Weights are loaded in self.dtype already; moving dtype again would re-cast fp32-pinned modules.
        self.pipe.to(self.device)
        self.composite = load_composite(self, model.finetuned) if model.finetuned else None
        self.corrector = self._load_corrector(model.noise_corrector) if model.noise_corrector else None

    def _load_corrector(self, ref: str):
        from pgraft.models.corrector import check_card, load_corrector

        self.require_flow()
        corrector = load_corrector(ref)
        check_card(corrector.card, ref, self.config.path, self.config.num_inference_steps, self.latent_shape(),
                   base_folder=self.path)
        return corrector.to(self.device)

    @property
    def is_flow(self) -> bool:
        """A flow-matching sampler (Euler steps of a learned velocity), the kind INC inverts."""
        return "FlowMatch" in type(self.pipe.scheduler).__name__

    def require_flow(self) -> None:
        if not self.is_flow:
            raise ModelError(f"{self.config.path!r} samples with {type(self.pipe.scheduler).__name__}, an ε- or "
                             "v-prediction sampler: inverse noise correction needs a flow model")

    def euler_grid(self):
        """The sampler's noise levels σ_0 = 1 … σ_K = 0 and the model's timestep at each step."""
        from pgraft.inversion import EulerGrid

        self.require_flow()
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(self.config.num_inference_steps, device="cpu")
        return EulerGrid(sigmas=scheduler.sigmas.float().cpu().clone(), timesteps=scheduler.timesteps.float().cpu().clone())

    def velocity_field(self, prompts: list[str], guidance_scale: float):
        """The sampler's velocity v(x, t, rows) with prompts[rows] as the conditions ("" is the
        null condition), guided by `guidance_scale` (1: the condition alone)."""
        raise ModelError(f"model.kind={self.kind}: inversion supports class_unet flow models")

    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_name)

    # subclass hooks
    def _load(self):
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def scheduler(self):
        """The sampler's scheduler (its timesteps and noise path define the training targets)."""
        return self.pipe.scheduler

    def training_condition(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition per prompt, the null condition) as tensors the train stage can hold as
        buffers: what `denoise` takes, computed once (text encoders are not trained)."""
        raise ModelError(f"model.kind={self.kind}: the train stage supports {', '.join(TRAINABLE_KINDS)}")

    def denoise(self, net, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """One forward of the trainable network `net` (this adapter's denoiser or a copy) on a
        batch with one condition row per sample."""
        raise ModelError(f"model.kind={self.kind}: the train stage supports {', '.join(TRAINABLE_KINDS)}")

    def _call_pipeline(self, prompts: list[str], latents: torch.Tensor, generators, callback: Callable):
        raise NotImplementedError

    def rollout(self, prompts: list[str], seeds: list[int], capture_steps: list[int]) -> Rollout:
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        n_steps = self.config.num_inference_steps
        check_capture_steps(capture_steps, n_steps)
        noise = initial_noise(seeds, self.latent_shape())
        if self.corrector is not None:
            noise = self.corrector.correct(noise)  # ε → z: the corrected start of the base flow
        scale = float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)) if self.scales_initial_noise else 1.0
        captured: dict[str, torch.Tensor] = {contract.INITIAL_NOISE: noise * scale}
        wanted = set(capture_steps)
        copies: list[torch.cuda.Event] = []  # device→host copies still in flight (CUDA only)

        def capture(name: str, latents: torch.Tensor) -> None:
            captured[name], copied = copy_to_host(latents)
            if copied is not None:
                copies.append(copied)

        if self.composite:
            self.composite.use_finetuned()

        def on_step_end(pipe, i, t, kwargs):
            k = i + 1  # steps taken so far
            if self.composite and k == self.composite.switch_step:
                self.composite.use_base()  # steps T→t done: the base model takes over for t→0
            if k in wanted:
                capture(contract.latent_name(k), kwargs["latents"])
            if k == n_steps:
                capture(contract.FINAL_LATENT, kwargs["latents"])
            return kwargs

        samples = self._call_pipeline(prompts, noise.to(self.device, self.dtype), step_generators(seeds), on_step_end)
        for copied in copies:
            copied.synchronize()  # the captures are read from here on
        timesteps = [float(t) for t in self.pipe.scheduler.timesteps]
        if len(timesteps) != n_steps:
            raise ModelError(f"the sampler visited {len(timesteps)} timesteps, expected model.num_inference_steps = {n_steps}")
        ordered = {contract.INITIAL_NOISE: captured[contract.INITIAL_NOISE]}
        ordered.update({contract.latent_name(k): captured[contract.latent_name(k)] for k in sorted(wanted)})
        ordered[contract.FINAL_LATENT] = captured[contract.FINAL_LATENT]
        return Rollout(
            latents=ordered,
            samples=samples,
            captured_timesteps={contract.latent_name(k): noise_level_after(self.pipe.scheduler, timesteps, k)
                                for k in sorted(wanted)},
            timesteps=timesteps,
            scheduler=type(self.pipe.scheduler).__name__,
            sample_kind=self.sample_kind,
        )


def card_decoding(card: dict, where: Path) -> tuple[str, Callable]:
    """(sample kind, decode) of a class-conditional model folder: its card's task decodes x_0
    (TaskSpec.decode); any other card is a pixel-space model (x_0 in [-1, 1] → uint8) unless it
    says `sample_kind` is something else.
    Only registered task names count: a name in a data file never imports code."""
    from pgraft.models.class_pipeline import latents_to_uint8
    from pgraft.tasks import TASKS

    task = card.get("task")
    if task in TASKS and TASKS[task].decode is not None:
        return TASKS[task].sample_kind, TASKS[task].decode
    if card.get("sample_kind", "image") == "image":  # no task, or a plug-in task's pixel-space model
        return "image", latents_to_uint8
    raise ModelError(f"{where}/{MODEL_CARD}: task {task!r} is not a registered task, so its samples cannot be decoded")


class ClassUNetAdapter(ModelAdapter):
    """Class-conditional UNet2DModel (e.g. the digits task): prompts map to class ids via the model card."""

    kind = "class_unet"

    def _denoiser_class(self):
        import diffusers

        return diffusers.UNet2DModel

    def _load(self):
        import diffusers

        from pgraft.models.class_pipeline import ClassConditionalPipeline

        card = json.loads((self.path / MODEL_CARD).read_text())
        self.prompt_to_class: dict[str, int] = card["prompts"]
        self.null_class = int(card["null_class"])
        self.sample_kind, self.decode = card_decoding(card, self.path)
        unet = self._denoiser_class().from_pretrained(self.path / "unet", dtype=self.dtype)
        sched_cfg = json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())
        scheduler_cls = getattr(diffusers, sched_cfg["_class_name"], None)
        if scheduler_cls is None or not issubclass(scheduler_cls, diffusers.SchedulerMixin):
            raise ModelError(f"{self.path}/scheduler: unknown scheduler class {sched_cfg['_class_name']!r}")
        return ClassConditionalPipeline(unet=unet, scheduler=scheduler_cls.from_pretrained(self.path / "scheduler"))

    def class_ids(self, prompts: list[str]) -> torch.Tensor:
        """Class ids of the prompts; the empty prompt is the null class (unconditional)."""
        unknown = sorted({p for p in prompts if p and p not in self.prompt_to_class})
        if unknown:
            known = list(self.prompt_to_class)[:3]
            raise ModelError(f"prompt {unknown[0]!r} is not one the model at {self.path} knows (e.g. {known})")
        return torch.tensor([self.prompt_to_class[p] if p else self.null_class for p in prompts], dtype=torch.long)

    def latent_shape(self):
        from pgraft.models.class_pipeline import sample_shape

        return sample_shape(self.pipe.unet)

    def velocity_field(self, prompts, guidance_scale):
        self.require_flow()
        labels = self.class_ids(prompts).to(self.device)

        @torch.no_grad()
        def velocity(x, t, rows):
            out = self.pipe.predict(x.to(self.device, self.dtype), t.to(self.device), labels[rows.to(self.device)],
                                    self.null_class, guidance_scale)
            return out.float().to(x.device)
        return velocity

    def training_condition(self, prompts):
        return self.class_ids(prompts), torch.tensor(self.null_class, dtype=torch.long)

    def denoise(self, net, x, timesteps, condition):
        return net(x, timesteps, class_labels=condition).sample

    def _call_pipeline(self, prompts, latents, generators, callback):
        x0 = self.pipe(
            class_labels=self.class_ids(prompts), null_class=self.null_class,
            num_inference_steps=self.config.num_inference_steps, guidance_scale=self.config.guidance_scale,
            latents=latents, generator=generators, output_type="latent", callback_on_step_end=callback,
        )
        return self.decode(x0)


class ClassSequenceAdapter(ClassUNetAdapter):
    """Class-conditional sequence transformer (pgraft/models/sequence.py; the molecules task): the
    same card and pipeline as class_unet, a (length, embed_dim) sample, decoded by the card's task."""

    kind = "class_sequence"

    def _denoiser_class(self):
        from pgraft.models.sequence import SequenceDenoiser

        return SequenceDenoiser


class LayoutSequenceAdapter(ClassSequenceAdapter):
    """The sequence transformer conditioned per position (the layout task): a prompt names the
    elements' classes in reading order ("title text figure"), one per position, the rest PAD; the
    empty prompt is unconditional. The card's task decodes x_0 with the prompts (the classes)."""

    kind = "layout_sequence"

    def _load(self):
        pipe = super()._load()
        card = json.loads((self.path / MODEL_CARD).read_text())
        self.element_classes: list[str] = card["element_classes"]
        self.pad_class = int(card["pad_class"])
        self.positions = int(pipe.unet.config.sample_length)
        return pipe

    def class_ids(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            names = prompt.split()
            unknown = [n for n in names if n not in self.element_classes]
            if unknown or len(names) > self.positions:
                why = f"unknown element class {unknown[0]!r}" if unknown else f"{len(names)} elements, more than {self.positions}"
                raise ModelError(f"prompt {prompt!r}: {why}; a prompt names up to {self.positions} element classes "
                                 f"of {self.element_classes} in reading order")
            if not names:
                rows.append([self.null_class] * self.positions)
                continue
            rows.append([self.element_classes.index(n) for n in names] + [self.pad_class] * (self.positions - len(names)))
        return torch.tensor(rows, dtype=torch.long)

    def training_condition(self, prompts):
        return self.class_ids(prompts), torch.full((self.positions,), self.null_class, dtype=torch.long)

    def _call_pipeline(self, prompts, latents, generators, callback):
        x0 = self.pipe(
            class_labels=self.class_ids(prompts), null_class=self.null_class,
            num_inference_steps=self.config.num_inference_steps, guidance_scale=self.config.guidance_scale,
            latents=latents, generator=generators, output_type="latent", callback_on_step_end=callback,
        )
        return self.decode(x0, prompts)


class _TextPipelineAdapter(ModelAdapter):
    pipeline_class_name = ""

    def _load(self):
        import diffusers

        cls = getattr(diffusers, self.pipeline_class_name)
        # Components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None.
        index = json.loads((self.path / "model_index.json").read_text())
        absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}
        return cls.from_pretrained(self.path, dtype=self.dtype, **absent)

    def _denoiser_config(self):
        raise NotImplementedError

    def _size(self) -> tuple[int, int]:
        default = self._denoiser_config().sample_size * self.pipe.vae_scale_factor
        return (self.config.height or default, self.config.width or default)

    def latent_shape(self):
        h, w = self._size()
        f = self.pipe.vae_scale_factor
        return (self._denoiser_config().in_channels, h // f, w // f)

    def _call_pipeline(self, prompts, latents, generators, callback):
        h, w = self._size()
        out = self.pipe(
            prompt=prompts, height=h, width=w, num_inference_steps=self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale, latents=latents, generator=generators,
            output_type="np", callback_on_step_end=callback,
        )
        return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


class StableDiffusionAdapter(_TextPipelineAdapter):
    """StableDiffusionPipeline 2.x (epsilon or v-prediction), classifier-free guidance."""

    kind = "stable_diffusion"
    pipeline_class_name = "StableDiffusionPipeline"

    def _denoiser_config(self):
        return self.pipe.unet.config

    def training_condition(self, prompts):
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
            null, _ = self.pipe.encode_prompt([""], self.device, 1, False)
        return embeds.float(), null[0].float()

    def denoise(self, net, x, timesteps, condition):
        return net(x, timesteps, encoder_hidden_states=condition.to(x.dtype)).sample


class SD3Adapter(_TextPipelineAdapter):
    """StableDiffusion3Pipeline: rectified flow with FlowMatchEulerDiscreteScheduler."""

    kind = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    scales_initial_noise = False  # SD3's prepare_latents uses given latents as they are

    def _denoiser_config(self):
        return self.pipe.transformer.config


# Dispatch table: model.kind -> adapter class.
ADAPTERS: dict[str, type[ModelAdapter]] = {
    ClassUNetAdapter.kind: ClassUNetAdapter,
    ClassSequenceAdapter.kind: ClassSequenceAdapter,
    LayoutSequenceAdapter.kind: LayoutSequenceAdapter,
    StableDiffusionAdapter.kind: StableDiffusionAdapter,
    SD3Adapter.kind: SD3Adapter,
}


# The kinds the train stage can tune: their adapters say how to condition and call the network.
TRAINABLE_KINDS = tuple(kind for kind, cls in ADAPTERS.items() if cls.denoise is not ModelAdapter.denoise)

# The kinds whose folder is a denoiser + scheduler + MODEL_CARD (prompts are classes).
CLASS_KINDS = (ClassUNetAdapter.kind, ClassSequenceAdapter.kind, LayoutSequenceAdapter.kind)


def check_model_folder(model: ModelSection) -> None:
    """Cheap checks (no weights loaded or downloaded) so a bad path or URI fails before any
    worker starts. The references may name storage (s3://…) or a local folder."""
    marker = MODEL_CARD if model.kind in CLASS_KINDS else "model_index.json"
    if not model_file_exists(model.path, marker):
        if not _has_any(model.path):
            raise ModelError(f"model.path {model.path!r} does not exist (publish the model there; for a task that "
                             "pretrains, run `pgraft pretrain TASK --out DIR` or let the round pipeline do it)")
        raise ModelError(f"model.path {model.path!r} is not a {model.kind} model folder (no {marker})")
    if model.finetuned and not model_file_exists(model.finetuned, COMPOSITE_CARD):
        raise ModelError(f"model.finetuned {model.finetuned!r} is not a train stage model folder (no {COMPOSITE_CARD})")
    if model.noise_corrector:
        from pgraft.models.corrector import check_card, read_card

        check_flow_model(model, "model.noise_corrector is set")
        check_card(read_card(model.noise_corrector), model.noise_corrector, model.path, model.num_inference_steps, None)


def sampler_class_name(model: ModelSection) -> str:
    """The class of the sampler the model will use, read from its folder (no weights loaded)."""
    if model.scheduler != "folder":
        return {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler"}[
            model.scheduler]
    relative = "scheduler/scheduler_config.json"
    if not model_file_exists(model.path, relative):
        raise ModelError(f"model.path {model.path!r} has no {relative}")
    raw = open_storage(model.path).get_bytes(relative) if is_remote(model.path) else \
        (local_folder(model.path) / relative).read_bytes()
    return json.loads(raw)["_class_name"]


def check_flow_model(model: ModelSection, why: str) -> None:
    """One line when the model's sampler is not a flow (what inverse noise correction needs)."""
    name = sampler_class_name(model)
    if "FlowMatch" not in name:
        raise ModelError(f"{why}, but model.path {model.path!r} samples with {name} (an ε- or v-prediction "
                         "sampler): inverse noise correction needs a flow model")


def _has_any(ref: str) -> bool:
    return bool(open_storage(ref).list("")) if is_remote(ref) else local_folder(ref).exists()


def load_adapter(model: ModelSection) -> ModelAdapter:
    return ADAPTERS[model.kind](model)




class Composite:
    """The composite sampler of P-GRAFT: fine-tuned denoiser for steps 0..switch_step-1 (T→t),
    the base for the rest. A full fine-tune swaps the network; a LoRA is switched off."""

    def __init__(self, adapter: ModelAdapter, card: dict, tuned=None):
        self.adapter, self.card, self.tuned = adapter, card, tuned
        self.base = adapter.denoiser
        self.switch_step = int(card["switch_step"])

    def use_finetuned(self) -> None:
        from pgraft.models.lora import set_lora_enabled

        if self.tuned is not None:
            setattr(self.adapter.pipe, self.adapter.denoiser_name, self.tuned)
        else:
            set_lora_enabled(self.base, True)

    def use_base(self) -> None:
        from pgraft.models.lora import set_lora_enabled

        setattr(self.adapter.pipe, self.adapter.denoiser_name, self.base)
        if self.tuned is None:
            set_lora_enabled(self.base, False)


def load_composite(adapter: ModelAdapter, folder: str) -> Composite:
    """Load a train stage's `model/` folder (a local folder or a storage location) onto the
    base model of `adapter`."""
    path = Path(fetch_model(folder))
    if not (path / COMPOSITE_CARD).is_file():
        raise ModelError(f"model.finetuned {folder!r} is not a train stage model folder (no {COMPOSITE_CARD})")
    card = json.loads((path / COMPOSITE_CARD).read_text())
    if card["kind"] != adapter.kind:
        raise ModelError(f"model.finetuned {folder!r} was trained from a {card['kind']} model, not {adapter.kind}")
    if card["num_inference_steps"] != adapter.config.num_inference_steps:
        raise ModelError(f"model.finetuned {folder!r} was trained for {card['num_inference_steps']} sampler steps; "
                         f"model.num_inference_steps is {adapter.config.num_inference_steps}")
    if card["finetuned"] == "lora":
        from safetensors.torch import load_file

        from pgraft.models.lora import inject_lora, load_lora

        lora = json.loads((path / "lora" / "config.json").read_text())
        inject_lora(adapter.denoiser, lora["r"], lora["target_modules"], lora["lora_alpha"], init=False)
        try:
            load_lora(adapter.denoiser, load_file(path / "lora" / "adapter.safetensors"))
        except ValueError as exc:
            raise ModelError(f"model.finetuned {folder!r}: {exc}") from None
        adapter.denoiser.to(adapter.device, adapter.dtype)
        return Composite(adapter, card)
    tuned = type(adapter.denoiser).from_pretrained(path / "unet", dtype=adapter.dtype).to(adapter.device).eval()
    return Composite(adapter, card, tuned)
