"""generate(): the one sampling path, from a seed to uint8 videos.

StaleSystem.sample (stale-train's samples), StalePipeline (stale-sample, exports) and stale-bench call it,
so a seed gives the same videos from a Lightning checkpoint and from its export: prior z ~ p0 drawn on the
CPU (flow.py) -> guided velocity (guidance.py) -> sampler from t = 0 to 1 (samplers.py) -> uint8.
"""

from __future__ import annotations

import torch
from torch import nn

from stale.diffusion import context as frame_context
from stale.diffusion import flow
from stale.diffusion.guidance import Velocity, classifier_free, classifier_guided, input_gradient
from stale.diffusion.hinge import margin
from stale.diffusion.samplers import get_sampler, scheduler_times, time_grid

OUTPUT_TYPES = ("uint8", "latent")


def text_model(model: nn.Module, text: tuple, negative: tuple):
    """cond=text as a label-conditional model: "label" i < B picks caption i, B + i the negative (or empty)
    caption of video i, so classifier-free guidance batches both branches as it does labels."""
    bank = torch.cat([text[0], negative[0].expand(len(text[0]), *negative[0].shape[1:])])  # (2B, L[, D])
    bank_mask = torch.cat([text[1], negative[1].expand(len(text[1]), -1)])  # (2B, L)

    def call(x, t, i):
        return model(x, t, torch.zeros_like(i), bank[i], bank_mask[i])

    n = len(text[0])
    return call, torch.arange(n, device=bank.device), torch.arange(n, 2 * n, device=bank.device)


def guided_velocity(
    model: nn.Module,
    labels: torch.Tensor,
    guidance: float = 1.0,
    classifier_guidance: float = 0.0,
    context: torch.Tensor | None = None,
    text: tuple | None = None,
    negative: tuple | None = None,
) -> Velocity:
    """The field the samplers integrate: v(x (B, C, T, H, W), t (B,)) for a model(x, t, y) -> (v, scores).

    The model's extra label row, num_classes, is the null label of classifier-free guidance. context: (T',) bool,
    the latent frames given clean: the model sees t = 1 there and the field is 0 there, so they never move.
    text (cond=text): the prompts' encoding (text (B, L[, D]), mask (B, L)); guidance runs against `negative`
    (the negative prompt's or the empty caption's encoding, one row or B rows), and classifier guidance follows
    the joy head's caption-match score.
    """
    call, null = model, torch.full_like(labels, model.config.num_classes)
    if text is not None:
        call, labels, null = text_model(model, text, negative)
    times = (lambda t: t) if context is None else (lambda t: frame_context.frame_times(t, context))  # noqa: E731
    velocity = classifier_free(lambda x, t, y: call(x, times(t), y)[0], labels, null, guidance)
    if classifier_guidance:
        if text is not None:  # the match score of the clip and its own prompt: the margin of "it matches" (+1)
            head_margin = lambda x, t: call(x, times(t), labels)[1].float().reshape(-1)  # noqa: E731
        else:  # the head is trained label-free (null label), so it is read the same way here
            head_margin = lambda x, t: margin(model(x, times(t), null)[1].float(), labels)  # noqa: E731
        velocity = classifier_guided(velocity, input_gradient(head_margin), classifier_guidance)
    if context is None:
        return velocity
    keep = frame_context.expand_frames(~context[None], torch.empty(0), model.config.patch[0])  # (1, 1, T, 1, 1)
    return lambda x, t: velocity(x, t) * keep.to(x)


@torch.no_grad()
def generate(
    model: nn.Module,
    labels: torch.Tensor,
    *,
    prior: str = "uniform",
    steps: int = 50,
    sampler: str = "euler",
    guidance: float = 1.0,
    classifier_guidance: float = 0.0,
    seed: int = 0,
    frames: int | None = None,
    size: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    prior_scale: float = 1.0,
    autoencoder=None,
    context: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    time_shift_base: int | None = None,
    time_shift_scale: float = 1.0,
    text: tuple | None = None,
    negative: tuple | None = None,
    scheduler: dict | None = None,
    output_type: str = "uint8",
) -> torch.Tensor:
    """uint8 videos (B, C, T, H, W) on the CPU for `labels` (B,), on the model's device.

    sampler: euler | heun | rk4. guidance: classifier-free weight w (1 = plain conditional, 0 = unconditional).
    classifier_guidance: scale of the hinge head's margin gradient (0 = off; a heuristic under the uniform
    prior, see guidance.py). frames/size default to the model's training clip; height/width (both or neither) give a
    non-square clip instead of size x size (any shape the patch divides). time_shift_base/scale: the objective's
    token-count time shift (flow.token_shift), applied to the time grid. The prior noise is drawn on
    the CPU for all videos at once, so every video starts from the same noise on any device and with any
    `batch_size` (which only bounds memory; the model's float sums can differ in the last bit with the batch
    size, so pixels may then differ by one level).

    context: uint8 (B, C, K, H, W), the first K frames given (image-to-video: K = 1; continuation): they start
    clean, stay fixed, and are copied into the output unchanged; the model generates the other frames. A latent
    model takes them in pixels (K frames its autoencoder encodes to K' latent frames, e.g. 1 + 4k for Wan's) and
    starts from their encoding.

    text, negative (model.cond=text): the encoded prompts (text (B, L[, D]), mask (B, L)) and what guidance runs
    against (the negative prompt's or the empty caption's encoding, 1 or B rows); `labels` only count the videos.

    scheduler: a diffusers FlowMatchEulerDiscreteScheduler config (samplers.scheduler_times): integrate on that
    scheduler's grid, with its own shift, as the family's pipeline does, instead of the even grid shifted by
    time_shift_base/scale (which then only shape the training times). output_type: "uint8" (the videos) or "latent":
    the sampler's float result (B, C, T, H, W) on the CPU, before the autoencoder (diffusers' output_type="latent").
    """
    solve = get_sampler(sampler)  # fails on an unknown name before any work
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not one of {list(OUTPUT_TYPES)}")
    cfg = model.config
    if (cfg.cond == "text") != (text is not None) or (text is not None and negative is None):
        raise ValueError(
            f"model.cond={cfg.cond}: "
            + (
                "give the prompts' encoding (text) and the negative or empty caption's (negative)"
                if cfg.cond == "text"
                else "a label model takes no text"
            )
        )
    device = next(model.parameters()).device
    if (height is None) != (width is None):
        raise ValueError(f"height={height} and width={width}: give both (a non-square clip) or neither")
    h, w = (height, width) if height is not None else (size, size)
    asked = f"frames={frames}, height={h}, width={w} (pixels) through the autoencoder, "
    if autoencoder is not None and (frames or h):  # a pixel clip -> its latent clip
        pixel_frames, pixel_size = autoencoder.pixel_shape(cfg.frames, cfg.size)
        pixel_frames = frames or pixel_frames
        _, frames, h, _ = autoencoder.latent_shape(pixel_frames, h or pixel_size)
        w = autoencoder.latent_shape(pixel_frames, w)[2] if w is not None else None
    shape = (len(labels), cfg.in_channels, frames or cfg.frames, h or cfg.size, w or cfg.size)
    pt, ph, pw = cfg.patch
    if shape[2] % pt or shape[3] % ph or shape[4] % pw:
        if autoencoder is not None:  # the user asked in pixels: answer in pixels
            raise ValueError(
                f"{asked}the latent clip (T, H, W) = {tuple(shape[2:])}, which the model's patch "
                f"{list(cfg.patch)} does not divide: choose height and width that are multiples of "
                f"{autoencoder.spatial * ph} pixels"
            )
        raise ValueError(
            f"a clip of (T, H, W) = {tuple(shape[2:])} (the model's) is not divisible by its patch "
            f"{list(cfg.patch)}: choose frames, height and width it divides"
        )
    noise = flow.sample_prior(
        shape, prior, generator=torch.Generator(device="cpu").manual_seed(seed), scale=prior_scale
    )
    clamp = prior == "uniform" and autoencoder is None and prior_scale == 1.0  # the pixel box [-1, 1]
    if autoencoder is not None:
        autoencoder.to(device)
    given = None
    if context is not None:
        k = context.shape[2]
        # the given frames are pixels: a latent model's clip is its autoencoder's pixel clip
        pixels = (
            (3, *(n * autoencoder.spatial for n in shape[3:])) if autoencoder is not None else shape[1:2] + shape[3:]
        )
        if (
            context.dtype != torch.uint8
            or context.shape[:2] != (shape[0], pixels[0])
            or context.shape[3:] != pixels[1:]
        ):
            raise ValueError(
                f"context must be uint8 (B, C, K, H, W) = ({shape[0]}, {pixels[0]}, K, {pixels[1]}, "
                f"{pixels[2]}); got {context.dtype} {tuple(context.shape)}"
            )
        if autoencoder is None:
            noise[:, :, :k] = flow.to_unit_range(context)
        else:  # encoded (the posterior mean, normalised): a causal autoencoder's first latent frames are theirs
            k = autoencoder.latent_grid(k, *pixels[1:])[0]
            noise[:, :, :k] = autoencoder.mode(autoencoder.encode(flow.to_unit_range(context))).cpu()
        given = torch.arange(shape[2] // pt, device=device) < frame_context.latent_context(k, shape[2], pt)  # (T',)
    n_tokens = flow.tokens(shape, cfg.patch)
    if scheduler is None:
        ts = flow.shift_time(time_grid(steps, device), flow.token_shift(n_tokens, time_shift_base, time_shift_scale))
    else:
        ts = scheduler_times(steps, scheduler, n_tokens, device)
    labels = labels.to(device)
    chunk = batch_size or len(labels)
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(labels), chunk):
            part = None if text is None else tuple(v[i : i + chunk].to(device) for v in text)
            neg = (
                None
                if negative is None
                else tuple(v[i : i + chunk].to(device) if len(v) > 1 else v.to(device) for v in negative)
            )
            velocity = guided_velocity(model, labels[i : i + chunk], guidance, classifier_guidance, given, part, neg)
            x = solve(velocity, noise[i : i + chunk].to(device), ts, clamp=clamp, progress=progress)
            if output_type == "latent":
                out.append(x.float().cpu())
                continue
            out.append(flow.to_uint8(x if autoencoder is None else autoencoder.decode(x)).cpu())
    finally:
        model.train(was_training)
    videos = torch.cat(out)
    if output_type == "latent":
        return videos
    if context is not None:  # bit-exact: the field is 0 there, and this also undoes any float round trip
        videos[:, :, : context.shape[2]] = context
    return videos
