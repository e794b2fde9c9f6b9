"""The Stale objective: L = L_velocity + lambda_dog L_dog + lambda_hinge L_hinge (METHOD.md).

One code path for every setting: the prior, the time sampler and the weights only change numbers, never which
functions run. Flow branch: x_t = (1 - t) z + t x, target u = x - z, labels dropped with `label_dropout`;
L_dog is the band-pass loss on the clean-sample error (1 - t)(v - u) (dog.py). Frame conditioning gives the
first K frames clean to a share `context_prob` of the clips, left out of the loss (context.py). Hinge branch: the
head must not see the label it predicts, so it is a second, label-free forward pass on `hinge_fraction` of the
batch at fresh times; mixup applies here only, never to the flow target (mixup.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stale.diffusion import context, flow
from stale.diffusion.dog import DOG_BANDS, DOG_K, DoGLoss
from stale.diffusion.hinge import hinge_loss, predict
from stale.diffusion.mixup import mixup, mixup_hinge


def velocity_loss(err: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The mean squared velocity error (B, C, T, H, W), over the generated frames only when `keep` marks them."""
    if keep is None:
        return err.pow(2).mean()
    return (err.pow(2) * keep).sum() / (keep.sum() * err[:, :, 0].numel() / err.shape[0]).clamp_min(1)


@dataclass
class StaleObjective:
    prior: str = "uniform"  # uniform (U[-1,1]^d, the paper's maximum-entropy prior) or gaussian (N(0, I))
    # a of the uniform prior U[-a, a]^d: null = 1 on pixels, sqrt(3) on normalised latents (train.py resolves it;
    # docs/latent.md says why)
    prior_scale: float | None = None
    time_sampling: str = "logit_normal"  # logit_normal (SD3) or uniform
    time_mean: float = 0.0  # logit-normal m
    time_std: float = 1.0  # logit-normal s
    label_dropout: float = 0.1  # p(null label) in the flow branch, for classifier-free guidance
    hinge_weight: float = 0.01  # lambda_hinge; 0 turns the head's training off; 0.1 slowed the flow's learning
    hinge_fraction: float = 0.25  # share of the batch used by the label-free hinge branch
    dog_weight: float = 0.0  # lambda_dog; 0 skips the band-pass term
    dog_bands: tuple = DOG_BANDS  # DoG sigmas in pixels (METHOD.md)
    dog_k: float = DOG_K  # sigma ratio of the two Gaussians of a band
    dog_temporal: bool = False  # also filter along time (a space-time DoG)
    mixup: bool = False  # "mess-up": mixup on the hinge branch only
    mixup_alpha: float = 0.2  # lam ~ Beta(a, a) (Zhang et al. 2017)
    context_frames: int = 0  # K: the first K frames are clean context (image-to-video: 1); 0 = off
    context_prob: float = 0.0  # share of the clips trained with context; the rest generate every frame
    # Time shift by token count (SD3, Open-Sora 1.2): t is shifted by scale * sqrt(tokens / base) in training and
    # sampling, so larger clips (more tokens, e.g. in a bigger bucket) spend more time near the noise. None = off.
    time_shift_base: int | None = None  # tokens (T' H' W') at which the shift is `time_shift_scale`
    time_shift_scale: float = 1.0
    # model.cond=text: p(the empty caption's encoding in place of the caption), for classifier-free guidance;
    caption_dropout: float = 0.1
    _dog: DoGLoss = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.prior not in flow.PRIORS:
            raise ValueError(f"diffusion.prior={self.prior!r} is not one of {flow.PRIORS}")
        if self.time_sampling not in flow.TIME_SAMPLERS:
            raise ValueError(f"diffusion.time_sampling={self.time_sampling!r} is not one of {flow.TIME_SAMPLERS}")
        if self.prior_scale is not None and not self.prior_scale > 0:
            raise ValueError(f"diffusion.prior_scale={self.prior_scale} must be > 0 (or null)")
        if self.time_std <= 0:
            raise ValueError(f"diffusion.time_std={self.time_std} must be > 0")
        if isinstance(self.context_frames, bool) or not isinstance(self.context_frames, int) or self.context_frames < 0:
            raise ValueError(f"diffusion.context_frames={self.context_frames!r} must be an integer >= 0")
        for name in ("label_dropout", "hinge_fraction", "context_prob", "caption_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"diffusion.{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("hinge_weight", "dog_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"diffusion.{name}={getattr(self, name)} must be >= 0")
        if self.time_shift_base is not None and (isinstance(self.time_shift_base, bool) or self.time_shift_base < 1):
            raise ValueError(f"diffusion.time_shift_base={self.time_shift_base!r} must be a token count >= 1 (or null)")
        if not self.time_shift_scale > 0:
            raise ValueError(f"diffusion.time_shift_scale={self.time_shift_scale} must be > 0")
        if self.mixup and self.mixup_alpha <= 0:
            raise ValueError(f"diffusion.mixup_alpha={self.mixup_alpha} must be > 0")
        self.dog_bands = tuple(float(s) for s in self.dog_bands)
        self._dog = DoGLoss(self.dog_bands, self.dog_k, self.dog_temporal)

    @property
    def scale(self) -> float:
        """a of U[-a, a]: prior_scale, 1 when unset (pixels)."""
        return 1.0 if self.prior_scale is None else float(self.prior_scale)

    def shift(self, shape, patch) -> float:
        """The time shift for clips of `shape` (B, C, T, H, W) through a model of `patch` (1 when off)."""
        return flow.token_shift(flow.tokens(shape, patch), self.time_shift_base, self.time_shift_scale)

    def __call__(
        self,
        model,
        x: torch.Tensor,
        y: torch.Tensor,
        null_label: int,
        text: tuple | None = None,
        empty: tuple | None = None,
    ) -> dict[str, torch.Tensor]:
        """x: float (B, C, T, H, W) in [-1, 1]; y: (B,) labels. Returns the total loss and its detached parts.
        text (model.cond=text): the captions' encoding (text (B, L[, D]), mask (B, L)) and `empty`, the empty
        caption's (1, L[, D]), (1, L): caption dropout puts it in, and the labels are not used."""
        if text is not None:
            return self.text_loss(model, x, text, empty)
        b = x.shape[0]
        z = flow.sample_prior(x.shape, self.prior, device=x.device, dtype=x.dtype, scale=self.scale)
        shift = 1.0 if self.time_shift_base is None else self.shift(x.shape, model.config.patch)
        t = flow.shift_time(
            flow.sample_time(b, self.time_sampling, self.time_mean, self.time_std, device=x.device), shift
        )
        t_in, tt, keep = self.frame_context(model, x, t)
        x_t = (1 - tt) * z + tt * x  # flow.interpolate, per frame; x_t = x exactly on context frames
        drop = torch.rand(b, device=x.device) < self.label_dropout
        v, _ = model(x_t, t_in, torch.where(drop, torch.full_like(y, null_label), y))
        err = v.float() - flow.velocity_target(z, x).float()  # (B, C, T, H, W)
        velocity = velocity_loss(err, keep)
        out = {"loss": velocity, "velocity": velocity.detach()}
        if self.dog_weight > 0:  # (1 - t) is 0 on context frames: they add nothing to the band-pass term
            dog = self._dog((1 - tt.float()) * err)  # on the clean-sample error x1_hat - x
            out["loss"] = out["loss"] + self.dog_weight * dog
            out["dog"] = dog.detach()
        if self.hinge_weight > 0:
            n = max(1, round(b * self.hinge_fraction))
            xh, yh = x[:n], y[:n]
            if self.mixup:
                xh, ya, yb, lam = mixup(xh, yh, self.mixup_alpha)
            zh = flow.sample_prior(xh.shape, self.prior, device=x.device, dtype=x.dtype, scale=self.scale)
            th = flow.shift_time(
                flow.sample_time(n, self.time_sampling, self.time_mean, self.time_std, device=x.device), shift
            )
            _, scores = model(flow.interpolate(zh, xh, th), th, torch.full_like(yh, null_label))
            if self.mixup:
                hinge = mixup_hinge(scores.float(), ya, yb, lam)
                yh = torch.where(lam >= 0.5, ya, yb)  # accuracy against the dominant clip's label
            else:
                hinge = hinge_loss(scores.float(), yh)
            out["loss"] = out["loss"] + self.hinge_weight * hinge
            out["hinge"] = hinge.detach()
            out["hinge_acc"] = (predict(scores) == yh).float().mean().detach()
        return out

    def frame_context(self, model, x: torch.Tensor, t: torch.Tensor):
        """Frame conditioning (context_frames, context_prob): the model's times t_in ((B,), or (B, T') with 1 on the
        clean context frames of the clips that draw them), t against x, and the frames in the loss ((B, 1, T, 1,
        1), None: all)."""
        if not (self.context_frames and self.context_prob > 0):
            return t, flow.expand_t(t, x), None
        pt = model.config.patch[0]
        k = context.latent_context(self.context_frames, x.shape[2], pt)
        ctx = context.draw_context(x.shape[0], x.shape[2] // pt, k, self.context_prob, device=x.device)  # (B, T')
        t_in = context.frame_times(t, ctx)  # (B, T'): 1 on context frames
        return t_in, context.expand_frames(t_in, x, pt), context.expand_frames(~ctx, x, pt)  # (B, 1, T, 1, 1)

    def text_loss(self, model, x: torch.Tensor, text: tuple, empty: tuple) -> dict[str, torch.Tensor]:
        """cond=text: the flow loss with caption dropout; the joy head learns whether a clip matches its caption.

        Hinge branch: on hinge_fraction of the batch (at least 2 clips), at fresh times, the head scores each clip
        with its own caption (target +1) and with the caption of the next clip in the batch (target -1, or +1 when
        the two captions are the same): max(0, 1 - y s), one binary hinge over both halves.
        """
        b = x.shape[0]
        emb, mask = text
        z = flow.sample_prior(x.shape, self.prior, device=x.device, dtype=x.dtype, scale=self.scale)
        # as the label path and sampling (generate) shift it
        shift = 1.0 if self.time_shift_base is None else self.shift(x.shape, model.config.patch)
        t = flow.shift_time(
            flow.sample_time(b, self.time_sampling, self.time_mean, self.time_std, device=x.device), shift
        )
        t_in, tt, keep = self.frame_context(model, x, t)
        drop = torch.rand(b, device=x.device) < self.caption_dropout
        e_emb, e_mask = (v.to(x.device).expand(b, *v.shape[1:]) for v in empty)
        dropped = drop.view(b, *([1] * (emb.ndim - 1)))
        cond = (torch.where(dropped, e_emb, emb), torch.where(drop[:, None], e_mask, mask))
        y0 = torch.zeros(b, dtype=torch.long, device=x.device)
        v, _ = model((1 - tt) * z + tt * x, t_in, y0, *cond)
        err = v.float() - flow.velocity_target(z, x).float()
        velocity = velocity_loss(err, keep)
        out = {"loss": velocity, "velocity": velocity.detach(), "caption_dropped": drop.float().mean().detach()}
        if self.dog_weight > 0:  # (1 - t) is 0 on context frames
            dog = self._dog((1 - tt.float()) * err)
            out["loss"] = out["loss"] + self.dog_weight * dog
            out["dog"] = dog.detach()
        if self.hinge_weight > 0 and b >= 2:
            n = min(b, max(2, round(b * self.hinge_fraction)))
            xh, ch, mh = x[:n], emb[:n], mask[:n]
            cn, mn = ch.roll(1, dims=0), mh.roll(1, dims=0)  # each clip with its neighbour's caption
            same = ((ch == cn) | ~mh[(...,) + (None,) * (ch.ndim - 2)]).flatten(1).all(1) & (mh == mn).all(1)
            zh = flow.sample_prior(xh.shape, self.prior, device=x.device, dtype=x.dtype, scale=self.scale)
            th = flow.shift_time(
                flow.sample_time(n, self.time_sampling, self.time_mean, self.time_std, device=x.device), shift
            )
            xt = flow.interpolate(zh, xh, th)
            _, scores = model(
                torch.cat([xt, xt]),
                torch.cat([th, th]),
                torch.zeros(2 * n, dtype=torch.long, device=x.device),
                torch.cat([ch, cn]),
                torch.cat([mh, mn]),
            )
            target = torch.cat([torch.ones(n, device=x.device), torch.where(same, 1.0, -1.0)]).long()
            hinge = hinge_loss(scores.float(), target)
            out["loss"] = out["loss"] + self.hinge_weight * hinge
            out["hinge"] = hinge.detach()
            out["hinge_acc"] = (predict(scores) == (target > 0).long()).float().mean().detach()
        return out
