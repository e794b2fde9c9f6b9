"""StalePipeline: load an export (or a checkpoint) and generate videos, with no pickle anywhere.

    pipe = StalePipeline.from_pretrained("export/")      # config.json + model.safetensors
    videos = pipe(num_videos=4, label=2, steps=50, sampler="euler", guidance=2.0, seed=0)  # uint8 (B, C, T, H, W)

The loop itself is the shared samplers' (stale.diffusion.samplers); this file only draws the prior,
wraps the model into a velocity field with classifier-free guidance, and converts to uint8. It matches
StaleSystem.sample (what stale-train writes after training), so a seed gives the same videos from the
Lightning checkpoint and from its export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from stale.diffusion import flow
from stale.diffusion.samplers import SAMPLERS, time_grid
from stale.export.checkpoint import read_checkpoint
from stale.export.export import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, save_pretrained
from stale.export.registry import build, check_targets


class ExportError(ValueError):
    """An export folder that is incomplete, malformed or from an unknown format; the message names the file."""


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255] (the same map as stale.system.stale_system.to_uint8)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class StalePipeline:
    """A Stale model, its prior and default sampling settings; call it to generate uint8 videos."""

    def __init__(self, model: torch.nn.Module, prior: str = "uniform", defaults: dict | None = None,
                 diffusion: dict | None = None, name: str | None = None):
        if prior not in flow.PRIORS:
            raise ValueError(f"prior={prior!r} is not one of {flow.PRIORS}")
        self.model = model.eval()
        self.prior = prior
        self.defaults = {"steps": 50, "sampler": "euler", "guidance": 1.0, **(defaults or {})}
        self.diffusion = dict(diffusion or {"prior": prior})  # kept so save_pretrained writes it back
        self.name = name

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "StalePipeline":
        """Load an export folder: JSON config (allow-listed targets only) and safetensors weights."""
        path = Path(path)
        cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        for f in (cfg_path, weights_path):
            if not f.is_file():
                raise ExportError(f"{f} does not exist: {path} is not a stale export (run stale-export first)")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ExportError(f"{cfg_path} is not valid JSON: {err}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ExportError(f"{cfg_path}: format={config.get('format') if isinstance(config, dict) else None!r}, "
                              f"expected {FORMAT!r}")
        if not isinstance(config.get("format_version"), int) or config["format_version"] > FORMAT_VERSION:
            raise ExportError(f"{cfg_path}: format_version={config.get('format_version')!r}; this stale reads "
                              f"versions <= {FORMAT_VERSION}")
        for key in ("model", "diffusion"):
            if not isinstance(config.get(key), dict):
                raise ExportError(f"{cfg_path} has no '{key}' mapping")
        check_targets(config, str(cfg_path))  # refuse before building anything
        model = build(config["model"], where=f"{cfg_path}: model")
        objective = build(config["diffusion"], where=f"{cfg_path}: diffusion")  # validates the prior
        try:
            state = load_file(str(weights_path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ExportError(f"{weights_path} is not a readable safetensors file: {err}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ExportError(f"{weights_path} does not fit the model in {cfg_path}: {err}") from None
        diffusion = {k: v for k, v in config["diffusion"].items() if k != "_target_"}
        return cls(model.to(device), prior=objective.prior, defaults=config.get("sample"), diffusion=diffusion,
                   name=config["model"].get("name"))

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> "StalePipeline":
        """Load a stale-train Lightning checkpoint (torch.load(weights_only=True)) without Lightning."""
        source = read_checkpoint(ckpt, weights)
        run = source.run_config
        diffusion_cfg = run.get("diffusion") or {"_target_": "stale.diffusion.objective.StaleObjective"}
        objective = build(diffusion_cfg, where=f"{ckpt}: run_config.diffusion")
        diffusion = {k: v for k, v in diffusion_cfg.items() if k != "_target_"}
        sample = {k: v for k, v in (run.get("sample") or {}).items() if k in ("steps", "sampler", "guidance")}
        return cls(source.build_model().to(device), prior=objective.prior, defaults=sample, diffusion=diffusion,
                   name=run["model"].get("name"))

    def save_pretrained(self, out: str | Path) -> dict[str, Path]:
        """Write this pipeline as an export folder (model.safetensors, config.json, provenance.json)."""
        return save_pretrained(self.model, out, name=self.name, diffusion=self.diffusion, sample=self.defaults)

    # ------------------------------------------------------------------ sampling
    @property
    def config(self):
        return self.model.config

    @property
    def null_label(self) -> int:
        return self.config.num_classes  # the model's extra label row: "no label" for guidance

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def labels(self, num_videos: int, label: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        """None cycles through the classes (as stale-train's samples do); an int repeats; a sequence is per video.
        The null label (num_classes) asks for unconditional samples."""
        if num_videos < 1:
            raise ValueError(f"num_videos={num_videos} must be >= 1")
        if label is None:
            labels = torch.arange(num_videos) % self.config.num_classes
        else:
            labels = label.long() if torch.is_tensor(label) else torch.as_tensor(label, dtype=torch.long)
            labels = labels.expand(num_videos).clone() if labels.ndim == 0 else labels.reshape(-1)
            if len(labels) != num_videos:
                raise ValueError(f"label has {len(labels)} entries for num_videos={num_videos}")
        bad = labels[(labels < 0) | (labels > self.null_label)]
        if len(bad):
            raise ValueError(f"label {bad[0].item()} is outside 0..{self.null_label} "
                             f"({self.config.num_classes} classes; {self.null_label} = unconditional)")
        return labels

    def velocity_fn(self, labels: torch.Tensor, guidance: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """v(x, t) for the samplers, with classifier-free guidance v_null + w (v_label - v_null); w = 1 is plain
        conditional sampling (one model call per step), w = 0 unconditional."""
        labels = labels.to(self.device)
        null = torch.full_like(labels, self.null_label)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if guidance == 0.0:
                return self.model(x, t, null)[0]
            v_label = self.model(x, t, labels)[0]
            if guidance == 1.0:
                return v_label
            v_null = self.model(x, t, null)[0]
            return v_null + guidance * (v_label - v_null)

        return velocity

    @torch.no_grad()
    def __call__(self, num_videos: int = 4, label: int | Sequence[int] | torch.Tensor | None = None,
                 steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
                 seed: int = 0, frames: int | None = None, size: int | None = None,
                 batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Generate uint8 videos (B, C, T, H, W) on the CPU. steps/sampler/guidance default to the export's
        `sample` settings. The prior noise is drawn on the CPU from `seed` for all videos at once, so every
        video starts from the same noise on any device and with any `batch_size` (which bounds memory; the
        model's float sums can differ in the last bit with the batch size, so pixels may differ by one level)."""
        steps = int(steps if steps is not None else self.defaults["steps"])
        sampler = sampler if sampler is not None else self.defaults["sampler"]
        guidance = float(guidance if guidance is not None else self.defaults["guidance"])
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not one of {sorted(SAMPLERS)}")
        cfg = self.config
        labels = self.labels(num_videos, label)
        shape = (num_videos, cfg.in_channels, frames or cfg.frames, size or cfg.size, size or cfg.size)
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = flow.sample_prior(shape, self.prior, generator=g)  # (B, C, T, H, W)
        ts = time_grid(steps, self.device)
        chunk = batch_size or num_videos
        out = []
        for i in range(0, num_videos, chunk):
            x = noise[i : i + chunk].to(self.device)
            velocity = self.velocity_fn(labels[i : i + chunk], guidance)
            x = SAMPLERS[sampler](velocity, x, ts, clamp=self.prior == "uniform", progress=progress)
            out.append(to_uint8(x).cpu())
        return torch.cat(out)
