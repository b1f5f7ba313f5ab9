"""Pretraining of a class-conditional base denoiser, shared by the built-in tasks: DDPM
(ε-prediction, sampled by DDIM with `leading` spacing) or rectified flow (velocity), with
label dropout to a reserved null class for classifier-free guidance."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pgraft.progress import progress_bar


def noise_and_target(kind: str, x0: torch.Tensor, scheduler, gen: torch.Generator):
    """(model input, timestep input, regression target) for one training batch."""
    eps = torch.randn(x0.shape, generator=gen)
    if kind == "ddpm":
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        target = {"epsilon": lambda: eps, "sample": lambda: x0,
                  "v_prediction": lambda: scheduler.get_velocity(x0, eps, t)}[scheduler.config.prediction_type]()
        return scheduler.add_noise(x0, eps, t), t, target
    # Rectified flow: x_s = (1 − s) x0 + s ε, velocity target ε − x0, timestep input 1000·s.
    from pgraft.targets import rectified_flow_pair

    s = torch.rand(len(x0), generator=gen)
    xs, target = rectified_flow_pair(x0, eps, s)
    return xs, s * scheduler.config.num_train_timesteps, target


def schedulers_for(kind: str, prediction_type: str = "epsilon", clip_sample: bool = True):
    """(training scheduler, sampler) of a base of `kind`; a DDPM base predicts `prediction_type`
    (epsilon, sample = x_0, or v_prediction), and its sampler clips the predicted x_0 to [-1, 1]
    when `clip_sample` (right for pixels in [-1, 1], wrong for data that reaches beyond)."""
    import diffusers

    if kind == "ddpm":
        train_sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                              prediction_type=prediction_type, clip_sample=clip_sample)
        # Sampler: DDIM with `leading` spacing, 20 of 1000 steps visit 950, 900, …, 0.
        return train_sched, diffusers.DDIMScheduler.from_config(train_sched.config, timestep_spacing="leading")
    if kind == "flow":
        sampler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        return sampler, sampler
    raise ValueError(f"unknown base kind {kind!r}")


def train_class_denoiser(net, x: torch.Tensor, y: torch.Tensor, null_class: int, kind: str, steps: int, seed: int,
                         batch_size: int = 128, lr: float = 5e-4, label_dropout: float = 0.1, progress: bool = True,
                         label: str = "pretrain", prediction_type: str = "epsilon", clip_sample: bool = True):
    """Train `net` (built by the caller after `torch.manual_seed(seed)`) on data `x` with class
    labels `y`; return (net in eval mode, its sampler, mean loss of the last 50 steps)."""
    train_sched, sampler = schedulers_for(kind, prediction_type, clip_sample)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    net.train()
    bar = progress_bar(steps, f"{label} {kind}", "step", enabled=progress)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < label_dropout
        labels = torch.where(drop.view(-1, *[1] * (y.dim() - 1)), null_class, y[idx])  # y: (N,) or (N, positions)
        model_in, t, target = noise_and_target(kind, x[idx], train_sched, gen)
        loss = F.mse_loss(net(model_in, t, class_labels=labels).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update(1)
    bar.close()
    net.eval()
    return net, sampler, float(np.mean(losses[-50:]))


def publish(location: str, build, folders: tuple[str, ...], threads: int | None = None, **options) -> dict:
    """Run `build(out_folder, **options)` (it writes some of `folders` and `summary.json` under the
    folder and returns the summary) on this node, and publish the result to `location`.

    A fresh local `location` is built in place; otherwise the build goes to a scratch folder and
    each folder is uploaded (storage) or copied (local), `summary.json` last: it marks the set
    complete. Where `location` already holds a set (a run asks for a base the first pretraining
    did not make), folders already published are kept as they are, and the summary gains the new
    figures without losing the old ones."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from pgraft.models.fetch import is_remote
    from pgraft.storage import open_storage

    if threads:
        torch.set_num_threads(threads)
    options.setdefault("progress", False)
    store = open_storage(location)
    before = json.loads(store.get_bytes("summary.json")) if store.exists("summary.json") else None
    if not is_remote(location) and before is None:
        return build(location, **options)
    with tempfile.TemporaryDirectory(prefix="pgraft-pretrain-") as scratch:
        summary = build(scratch, **options)
        for name in folders:
            if not (Path(scratch) / name).is_dir() or before is not None and store.list(name):
                continue  # not built, or published before (kept: runs may already have used it)
            if is_remote(location):
                store.upload_folder(Path(scratch) / name, name)
            else:
                shutil.copytree(Path(scratch) / name, Path(location) / name)
        if before is None:
            store.put_file(Path(scratch) / "summary.json", "summary.json")
            return summary
    merged = {**summary, **before}  # the published folders' own figures stay; the new base's are added
    merged["bases"] = sorted(set(before.get("bases", [])) | set(summary.get("bases", [])))
    store.put_bytes("summary.json", json.dumps(merged, indent=1).encode())
    return merged
