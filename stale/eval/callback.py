"""FDDCallback: log a small Fréchet DoG distance on validation during training (`val/fdd`; docs/evaluation.md).

At the end of each validation run rank 0 samples `num_videos` clips (labels cycling through the classes, fixed
seed) with the weights validation used and compares their frame features with those of the validation clips just
seen (up to `max_real`). Small sets make the number noisy and biased upwards: a trend line for one run, not a
number to compare across set sizes (stale-eval is for that). Enable it with a `callbacks` entry
(`_target_: stale.eval.callback.FDDCallback`, `num_videos`, `steps`).
"""

from __future__ import annotations

import lightning as L
import torch

from stale.eval.features import frame_features
from stale.eval.frechet import frechet_between


class FDDCallback(L.Callback):
    def __init__(
        self, num_videos: int = 16, steps: int = 10, sampler: str = "euler", max_real: int = 256, seed: int = 0
    ):
        if num_videos < 2:
            raise ValueError(f"FDDCallback num_videos={num_videos} must be >= 2 (a covariance needs two clips)")
        self.num_videos, self.steps, self.sampler, self.max_real, self.seed = num_videos, steps, sampler, max_real, seed
        self._real: list[torch.Tensor] = []
        self._n_real = 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._real, self._n_real = [], 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._n_real >= self.max_real:
            return
        video = batch[0][: self.max_real - self._n_real]  # uint8 (B, C, T, H, W)
        self._real.append(frame_features(video.detach().cpu().permute(0, 2, 3, 4, 1)).flatten(0, 1))
        self._n_real += video.shape[0]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._n_real < 2:
            return
        k = pl_module.model.config.num_classes
        labels = torch.arange(self.num_videos) % k
        videos = pl_module.sample(labels, steps=self.steps, sampler=self.sampler, seed=self.seed)  # (B, C, T, H, W)
        gen = frame_features(videos.cpu().permute(0, 2, 3, 4, 1)).flatten(0, 1)
        value = frechet_between(gen.numpy(), torch.cat(self._real).numpy())
        pl_module.log("val/fdd", value, rank_zero_only=True, batch_size=self.num_videos)
