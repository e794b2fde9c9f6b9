"""generate(): the one sampling path, from a seed to uint8 videos.

StaleSystem.sample (stale-train's samples), StalePipeline (stale-sample, exports) and stale-bench call it,
so a seed gives the same videos from a Lightning checkpoint and from its export: prior z ~ p0 drawn on the
CPU (flow.py) -> guided velocity (guidance.py) -> sampler from t = 0 to 1 (samplers.py) -> uint8.
"""

from __future__ import annotations

import torch
from torch import nn

from stale.diffusion import flow
from stale.diffusion.guidance import Velocity, classifier_free, classifier_guided, input_gradient
from stale.diffusion.hinge import margin
from stale.diffusion.samplers import get_sampler, time_grid


def guided_velocity(model: nn.Module, labels: torch.Tensor, guidance: float = 1.0,
                    classifier_guidance: float = 0.0) -> Velocity:
    """The field the samplers integrate: v(x (B, C, T, H, W), t (B,)) for a model(x, t, y) -> (v, scores).

    The model's extra label row, num_classes, is the null label of classifier-free guidance.
    """
    null = torch.full_like(labels, model.config.num_classes)
    velocity = classifier_free(lambda x, t, y: model(x, t, y)[0], labels, null, guidance)
    if classifier_guidance:
        # the head is trained label-free (null label), so it is read the same way here
        head_margin = lambda x, t: margin(model(x, t, null)[1].float(), labels)  # noqa: E731
        velocity = classifier_guided(velocity, input_gradient(head_margin), classifier_guidance)
    return velocity


@torch.no_grad()
def generate(model: nn.Module, labels: torch.Tensor, *, prior: str = "uniform", steps: int = 50,
             sampler: str = "euler", guidance: float = 1.0, classifier_guidance: float = 0.0, seed: int = 0,
             frames: int | None = None, size: int | None = None, batch_size: int | None = None,
             progress: bool = False, prior_scale: float = 1.0, autoencoder=None) -> torch.Tensor:
    """uint8 videos (B, C, T, H, W) on the CPU for `labels` (B,), on the model's device.

    sampler: euler | heun | rk4. guidance: classifier-free weight w (1 = plain conditional, 0 = unconditional).
    classifier_guidance: scale of the hinge head's margin gradient (0 = off; a heuristic under the uniform
    prior, see guidance.py). frames/size default to the model's training clip. The prior noise is drawn on
    the CPU for all videos at once, so every video starts from the same noise on any device and with any
    `batch_size` (which only bounds memory; the model's float sums can differ in the last bit with the batch
    size, so pixels may then differ by one level).
    """
    solve = get_sampler(sampler)  # fails on an unknown name before any work
    cfg = model.config
    device = next(model.parameters()).device
    if autoencoder is not None and (frames or size):  # a pixel clip -> its latent clip
        pixel_frames, pixel_size = autoencoder.pixel_shape(cfg.frames, cfg.size)
        _, frames, size, _ = autoencoder.latent_shape(frames or pixel_frames, size or pixel_size)
    shape = (len(labels), cfg.in_channels, frames or cfg.frames, size or cfg.size, size or cfg.size)
    noise = flow.sample_prior(shape, prior, generator=torch.Generator(device="cpu").manual_seed(seed),
                              scale=prior_scale)
    clamp = prior == "uniform" and autoencoder is None and prior_scale == 1.0  # the pixel box [-1, 1]
    if autoencoder is not None:
        autoencoder.to(device)
    ts = time_grid(steps, device)
    labels = labels.to(device)
    chunk = batch_size or len(labels)
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(labels), chunk):
            velocity = guided_velocity(model, labels[i : i + chunk], guidance, classifier_guidance)
            x = solve(velocity, noise[i : i + chunk].to(device), ts, clamp=clamp, progress=progress)
            out.append(flow.to_uint8(x if autoencoder is None else autoencoder.decode(x)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
