"""StalePipeline: load an export (or a checkpoint) and generate videos, with no pickle anywhere.

    pipe = StalePipeline.from_pretrained("export/")      # config.json + model.safetensors
    videos = pipe(num_videos=4, label=2, steps=50, sampler="euler", guidance=2.0, seed=0)  # uint8 (B, C, T, H, W)

A latent model's export carries its autoencoder (vae/ beside the weights): the pipeline decodes through it and
returns pixels, as stale-train's samples do. A pretrained backbone's export (stale/export/backbone.py) is rebuilt
from the folder alone: its transformer/ (or its pretrained base plus pytorch_lora_weights.safetensors), its joy token
and hinge head, its prior.

Sampling is stale.diffusion.generate, the same function StaleSystem.sample (what stale-train writes after
training) calls, so a seed gives the same videos from the Lightning checkpoint and from its export; this
file only loads the model and fills in the export's default settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from stale.checkpoint.export_reader import read_export
from stale.checkpoint.layout import DIFFUSION_TARGET, SAMPLE_DEFAULTS
from stale.checkpoint.registry import build
from stale.checkpoint.weights import read_checkpoint
from stale.diffusion import flow
from stale.diffusion.generate import generate
from stale.diffusion.samplers import read_scheduler
from stale.export.export import save_pretrained


class StalePipeline:
    """A Stale model, its prior and default sampling settings; call it to generate uint8 videos."""

    def __init__(
        self,
        model: torch.nn.Module,
        prior: str = "uniform",
        defaults: dict | None = None,
        diffusion: dict | None = None,
        name: str | None = None,
        prior_scale: float = 1.0,
        autoencoder=None,
        text_encoder=None,
    ):
        if prior not in flow.PRIORS:
            raise ValueError(f"prior={prior!r} is not one of {flow.PRIORS}")
        self.model = model.eval()
        self.prior = prior
        self.defaults = {**SAMPLE_DEFAULTS, **(defaults or {})}
        self.diffusion = dict(diffusion or {"prior": prior})  # kept so save_pretrained writes it back
        self.name = name
        self.prior_scale = float(prior_scale)
        self.autoencoder = autoencoder  # stale.latent Autoencoder of a latent model: samples are decoded through it
        self.text_encoder = text_encoder  # stale.text encoder of a model.cond=text model: prompts go through it
        if model.config.cond == "text" and text_encoder is None:
            raise ValueError(
                "a model.cond=text model needs its text encoder (the export's or run config's text_encoder)"
            )

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", lora: str | Path | None = None
    ) -> "StalePipeline":
        """Load an export folder: JSON config (allow-listed targets only) and safetensors weights; `lora`: an adapter
        folder (stale-export merge=false) to inject into the model (stale.models.finetune.load_adapter)."""
        export = read_export(path, device, lora)
        objective, config = export.objective, export.config
        return cls(
            export.model.to(device),
            prior=objective.prior,
            defaults=config.get("sample"),
            diffusion={k: v for k, v in config["diffusion"].items() if k != "_target_"},
            name=config["model"].get("name"),
            prior_scale=objective.scale,
            autoencoder=export.autoencoder,
            text_encoder=export.text_encoder,
        )

    @classmethod
    def from_checkpoint(
        cls, ckpt: str | Path, weights: str = "ema", device: str | torch.device = "cpu"
    ) -> "StalePipeline":
        """Load a stale-train Lightning checkpoint (torch.load(weights_only=True)) without Lightning."""
        source = read_checkpoint(ckpt, weights)
        run = source.run_config
        diffusion_cfg = run.get("diffusion") or {"_target_": DIFFUSION_TARGET}
        objective = build(diffusion_cfg, where=f"{ckpt}: run_config.diffusion")
        diffusion = {k: v for k, v in diffusion_cfg.items() if k != "_target_"}
        sample = {k: v for k, v in (run.get("sample") or {}).items() if k in SAMPLE_DEFAULTS}
        return cls(
            source.build_model().to(device),
            prior=objective.prior,
            defaults=sample,
            diffusion=diffusion,
            name=run["model"].get("name"),
            prior_scale=objective.scale,
            autoencoder=source.build_autoencoder(device),
            text_encoder=source.build_text_encoder(device),
        )

    def save_pretrained(self, out: str | Path, merge: bool = True) -> dict[str, Path]:
        """Write this pipeline as an export folder (model.safetensors, config.json, provenance.json). merge: a
        backbone's LoRA folded into transformer/ (true) or written in diffusers' LoRA format (false)."""
        return save_pretrained(
            self.model,
            out,
            merge=merge,
            name=self.name,
            diffusion=self.diffusion,
            sample=self.defaults,
            autoencoder=self.autoencoder,
            text_encoder=self.text_encoder,
        )

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
            raise ValueError(
                f"label {bad[0].item()} is outside 0..{self.null_label} "
                f"({self.config.num_classes} classes; {self.null_label} = unconditional)"
            )
        return labels

    @torch.no_grad()
    def __call__(
        self,
        num_videos: int = 4,
        label: int | Sequence[int] | torch.Tensor | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        seed: int = 0,
        frames: int | None = None,
        size: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        classifier_guidance: float | None = None,
        context: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        scheduler: dict | None = None,
    ) -> torch.Tensor:
        """Generate uint8 videos (B, C, T, H, W) on the CPU with stale.diffusion.generate: pixels, decoded through
        the autoencoder for a latent model (frames/size/height/width are then the pixel clip's; height and width give
        a non-square clip). steps, sampler, guidance, classifier_guidance and scheduler (the time grid: a diffusers
        flow scheduler's config, stale.diffusion.samplers.read_scheduler) default to the export's `sample` settings;
        batch_size bounds memory.
        context: uint8 (C, K, H, W) or (B, C, K, H, W), the first K frames of every video (image-to-video: K = 1).
        prompt (model.cond=text): one string for every video, or one per video; guidance runs against
        negative_prompt, else the empty caption."""
        settings = self.settings(
            steps=steps,
            sampler=sampler,
            guidance=guidance,
            classifier_guidance=classifier_guidance,
            scheduler=scheduler,
        )
        if context is not None and context.ndim == 4:
            context = context[None].expand(num_videos, *context.shape).contiguous()
        text = negative = None
        if self.config.cond == "text":
            prompts = self.prompts(num_videos, prompt)
            label = torch.zeros(num_videos, dtype=torch.long)  # a text model ignores labels; they count the videos
            self.text_encoder.to(self.device)
            text = self.text_encoder.encode(prompts)
            negative = self.text_encoder.encode([negative_prompt]) if negative_prompt else self.text_encoder.empty()
        elif prompt is not None or negative_prompt is not None:
            raise ValueError("prompt= needs a text-conditioned model (model.cond=text); this one takes label=")
        return generate(
            self.model,
            self.labels(num_videos, label),
            prior=self.prior,
            seed=seed,
            frames=frames,
            size=size,
            batch_size=batch_size,
            progress=progress,
            prior_scale=self.prior_scale,
            autoencoder=self.autoencoder,
            context=context,
            height=height,
            width=width,
            time_shift_base=self.diffusion.get("time_shift_base"),
            time_shift_scale=float(self.diffusion.get("time_shift_scale", 1.0)),
            text=text,
            negative=negative,
            **settings,
        )

    def prompts(self, num_videos: int, prompt: str | Sequence[str] | None) -> list[str]:
        """One prompt per video: a string repeats; a list must have num_videos entries."""
        if prompt is None:
            raise ValueError('this model is text-conditioned: give prompt="..." (or prompts=FILE, one per line)')
        prompts = [prompt] * num_videos if isinstance(prompt, str) else [str(p) for p in prompt]
        if len(prompts) != num_videos:
            raise ValueError(f"{len(prompts)} prompts for num_videos={num_videos}")
        return prompts

    def settings(self, **given) -> dict:
        """The sampling settings: each given value, else the export's default."""
        out = {k: given[k] if given.get(k) is not None else self.defaults[k] for k in SAMPLE_DEFAULTS}
        return {
            "steps": int(out["steps"]),
            "sampler": out["sampler"],
            "guidance": float(out["guidance"]),
            "classifier_guidance": float(out["classifier_guidance"]),
            "scheduler": read_scheduler(out["scheduler"], key="scheduler"),
        }
