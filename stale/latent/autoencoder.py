"""A frozen pretrained video autoencoder (diffusers) between pixel clips and the model's normalised latents.

    ae = load_autoencoder("path/to/vae")             # or a hub id; the class comes from its config.json
    moments = ae.encode(pixels)                     # pixels [-1, 1] (B, 3, T, H, W) -> (B, 2C, T', H', W')
    z = ae.sample(moments)                          # one posterior draw, normalised (B, C, T', H', W')
    pixels = ae.decode(z)                           # normalised latents -> pixels [-1, 1] (B, 3, T, H, W)

The video classes (CLASSES) are causal in time: the first frame alone, then groups of `temporal` frames
(T = 1 + temporal * k, T' = 1 + k); AutoencoderKL encodes frame by frame, T' = T. `moments` are the posterior's
mean and log-variance on the channel axis; normalisation z = (latent - shift) * scale per channel comes from the
autoencoder's own constants, else from statistics measured on the data (docs/latent.md).

Deliberately not an nn.Module: held by the LightningModule it stays out of its state_dict, its optimiser and
Lightning's device moves, and the EMA callback's deep copy shares it instead of copying it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from stale.utils.hashing import weights_sha256

# diffusers' autoencoder classes stale reads, by the `_class_name` of their config.json
CLASSES = (
    "AutoencoderKLWan",
    "AutoencoderKLCogVideoX",
    "AutoencoderKLLTXVideo",
    "AutoencoderKLHunyuanVideo",
    "AutoencoderKL",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NORMALIZATIONS = ("auto", "vae", "data")


class AutoencoderError(ValueError):
    """An autoencoder that cannot be loaded or used as configured; the message names the key and the path."""


def _compression(cls: str, model) -> tuple[int, int, int]:
    """(latent channels, spatial factor, temporal factor) from the class's config, as its encoder builds them."""
    c = model.config
    if cls == "AutoencoderKLWan":
        spatial = 2 ** (len(c.dim_mult) - 1) * (c.patch_size or 1)
        return c.z_dim, spatial, 2 ** sum(bool(d) for d in c.temperal_downsample)
    if cls == "AutoencoderKLCogVideoX":
        return c.latent_channels, 2 ** (len(c.down_block_types) - 1), int(c.temporal_compression_ratio)
    if cls in ("AutoencoderKLLTXVideo", "AutoencoderKLHunyuanVideo"):  # both set these in __init__
        return c.latent_channels, int(model.spatial_compression_ratio), int(model.temporal_compression_ratio)
    return c.latent_channels, 2 ** (len(c.block_out_channels) - 1), 1  # AutoencoderKL, frame by frame


def _constants(cls: str, model, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) per channel from the autoencoder's own constants, as its diffusers pipelines apply them:
    Wan (latent - mean) / std; LTX (latent - mean) * scaling_factor / std (buffers); the others
    (latent - shift_factor) * scaling_factor, or with latents_mean/latents_std when the config has them."""
    c = model.config
    ones = torch.ones(channels)
    mean = getattr(c, "latents_mean", None)
    std = getattr(c, "latents_std", None)
    if cls == "AutoencoderKLLTXVideo":
        mean, std = model.latents_mean.float().cpu(), model.latents_std.float().cpu()
    factor = getattr(c, "scaling_factor", None) or 1.0
    if cls == "AutoencoderKLWan":
        factor = 1.0  # Wan's config has no scaling_factor: its std is the whole scale
    if mean is not None and std is not None:
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (channels,) or std.shape != (channels,):
            raise AutoencoderError(
                f"latents_mean/latents_std have {mean.numel()}/{std.numel()} entries for {channels} latent channels"
            )
        return mean, factor / std
    return ones * float(getattr(c, "shift_factor", None) or 0.0), ones * float(factor)


def _nearest(valid, value: int) -> str:
    lower = max((v for v in valid if v <= value), default=None)
    upper = min(v for v in valid if v >= value)
    return " or ".join(str(v) for v in dict.fromkeys(x for x in (lower, upper) if x is not None))


class Autoencoder:
    """A frozen diffusers autoencoder in eval mode, with its latent shape rules and normalisation."""

    def __init__(
        self,
        model: torch.nn.Module,
        cls: str,
        source: dict,
        shift: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        normalization: str = "auto",
        stats: dict | None = None,
        measure_stats: bool = False,
    ):
        if normalization not in NORMALIZATIONS:
            raise AutoencoderError(f"vae.normalization={normalization!r} is not one of {NORMALIZATIONS}")
        self.model = model.eval().requires_grad_(False)
        self.cls, self.source = cls, dict(source)
        self.channels, self.spatial, self.temporal = _compression(cls, model)
        self.per_frame = cls == "AutoencoderKL"
        self.dtype = next(model.parameters()).dtype
        self.normalization = normalization
        if shift is None or scale is None:  # resolve the normalisation
            shift, scale = _constants(cls, model, self.channels)
            identity = bool((shift == 0).all() and (scale == 1).all())
            self.normalization = "data" if normalization == "data" or (normalization == "auto" and identity) else "vae"
            if self.normalization == "data" and stats is not None:
                shift = torch.as_tensor(stats["mean"], dtype=torch.float32)
                scale = 1 / torch.as_tensor(stats["std"], dtype=torch.float32).clamp_min(1e-6)
            elif self.normalization == "data" and measure_stats:
                shift = scale = None  # stale-encode stores raw moments and measures the statistics itself
            elif self.normalization == "data":
                why = (
                    "vae.normalization=data asks for"
                    if normalization == "data"
                    else "its own constants are the identity (latents_mean 0 and latents_std 1, or no scaling_factor), "
                    "so it needs"
                )
                raise AutoencoderError(
                    f"{cls} at vae.pretrained={source.get('pretrained')!r}: {why} per-channel statistics of the data. "
                    "Encode a cache with stale-encode (it measures them) and train with data=latents, or set "
                    "vae.stats=CACHE/info.json"
                )
        self.shift = None if shift is None else torch.as_tensor(shift, dtype=torch.float32).reshape(-1)
        self.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if self.shift is not None and (self.shift.numel() != self.channels or self.scale.numel() != self.channels):
            raise AutoencoderError(
                f"vae.shift/vae.scale have {self.shift.numel()}/{self.scale.numel()} entries "
                f"for {self.channels} latent channels"
            )

    def __deepcopy__(self, memo):  # frozen: the EMA callback's copy of the system shares it
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "Autoencoder":
        if torch.device(device) != self.device:
            self.model.to(device)
        return self

    # ------------------------------------------------------------------ shapes
    def valid_frames(self, up_to: int) -> list[int]:
        return list(range(1, up_to + 1)) if self.temporal == 1 else list(range(1, up_to + 1, self.temporal))

    def check_clip(self, frames: int, size: int, keys: tuple[str, str] = ("data.frames", "data.size")) -> None:
        """Raise AutoencoderError naming the key and the nearest valid values for a clip this autoencoder cannot take."""
        name = f"{self.cls} at vae.pretrained={self.source.get('pretrained')!r}"
        if not isinstance(frames, int) or frames < 1 or (frames - 1) % self.temporal:
            rule = f"1 + {self.temporal}k frames (causal: the first frame alone)" if self.temporal > 1 else ">= 1 frame"
            near = _nearest(self.valid_frames(max(frames, 1) + self.temporal), max(frames, 1))
            raise AutoencoderError(f"{keys[0]}={frames}: {name} takes {rule}; nearest valid: {keys[0]}={near}")
        if not isinstance(size, int) or size < self.spatial or size % self.spatial:
            near = _nearest(range(self.spatial, max(size, 1) + self.spatial + 1, self.spatial), max(size, 1))
            raise AutoencoderError(
                f"{keys[1]}={size}: {name} compresses space by {self.spatial}, so the size must "
                f"be a multiple of {self.spatial}; nearest valid: {keys[1]}={near}"
            )

    def latent_shape(self, frames: int, size: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of a frames x size x size pixel clip (after check_clip)."""
        self.check_clip(frames, size)
        return self.channels, *self.latent_grid(frames, size, size)

    def latent_grid(self, frames: int, height: int, width: int, key: str | None = None) -> tuple[int, int, int]:
        """(T', H', W') of a frames x height x width pixel clip (a bucket: data.buckets[i]); AutoencoderError names
        `key` and the side this autoencoder cannot take."""
        if key is not None:
            self.check_clip(frames, height, keys=(f"{key} frames", f"{key} height"))
            self.check_clip(frames, width, keys=(f"{key} frames", f"{key} width"))
        t = frames if self.temporal == 1 else 1 + (frames - 1) // self.temporal
        return t, height // self.spatial, width // self.spatial

    def pixel_shape(self, frames: int, size: int) -> tuple[int, int]:
        """(T, H) of the pixel clip a T' x H' latent decodes to."""
        return (frames if self.temporal == 1 else 1 + (frames - 1) * self.temporal), size * self.spatial

    # ------------------------------------------------------------------ encode / decode
    def _per_frame(self, x: torch.Tensor, fn) -> torch.Tensor:
        b, _, t = x.shape[:3]
        y = fn(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W)
        return y.unflatten(0, (b, t)).transpose(1, 2)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior moments (B, 2C, T', H', W') float32 of pixels in [-1, 1] (B, 3, T, H, W)."""
        x = pixels.to(self.device, self.dtype)

        def enc(v):
            dist = self.model.encode(v).latent_dist
            return torch.cat([dist.mean, dist.logvar], 1)

        with torch.autocast(self.device.type, enabled=False):  # vae.dtype decides, not the trainer's precision
            return (self._per_frame(x, enc) if self.per_frame else enc(x)).float()

    def _resolved(self) -> None:
        if self.shift is None:
            raise AutoencoderError(
                f"{self.cls}: the normalisation waits for the data's statistics (loaded with "
                "measure_stats=True, as stale-encode does, which stores raw moments)"
            )

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        self._resolved()
        shape = (1, -1) + (1,) * (latent.ndim - 2)
        return (latent - self.shift.to(latent).view(shape)) * self.scale.to(latent).view(shape)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        self._resolved()
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return z / self.scale.to(z).view(shape) + self.shift.to(z).view(shape)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One normalised posterior draw from moments (the global RNG unless a generator is given)."""
        mean, logvar = moments.float().chunk(2, dim=1)
        eps = (
            torch.randn(mean.shape, generator=generator, device=mean.device)
            if generator is not None
            else torch.randn_like(mean)
        )
        return self.normalize(mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps)

    def mode(self, moments: torch.Tensor) -> torch.Tensor:
        """The normalised posterior mean (validation: no noise)."""
        return self.normalize(moments.float().chunk(2, dim=1)[0])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W') -> pixels float32 in [-1, 1]-ish (B, 3, T, H, W)."""
        latent = self.denormalize(z.float()).to(self.device, self.dtype)
        dec = lambda v: self.model.decode(v).sample  # noqa: E731
        with torch.autocast(self.device.type, enabled=False):
            return (self._per_frame(latent, dec) if self.per_frame else dec(latent)).float()

    # ------------------------------------------------------------------ records
    def node(self) -> dict:
        """The plain-JSON description that rebuilds this autoencoder: where it came from and its normalisation."""
        self._resolved()
        return {
            **self.source,
            "class": self.cls,
            "normalization": self.normalization,
            "shift": [float(v) for v in self.shift],
            "scale": [float(v) for v in self.scale],
        }

    def save(self, out: str | Path) -> Path:
        """save_pretrained (config.json + safetensors) into `out`: an export's own copy."""
        self.model.save_pretrained(str(out), safe_serialization=True)
        return Path(out)


def _read_config(pretrained: str, subfolder: str | None) -> dict:
    """The autoencoder's config.json: from a local folder, else (a hub id) through diffusers' own resolver."""
    path = Path(pretrained).expanduser()
    looks_local = path.exists() or pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1
    if looks_local:
        folder = path / subfolder if subfolder else path
        if not path.is_dir():
            raise AutoencoderError(f"vae.pretrained={pretrained!r}: no such folder ({path.resolve()})")
        if not (folder / "config.json").is_file():
            raise AutoencoderError(
                f"vae.pretrained={pretrained!r}: {folder / 'config.json'} does not exist "
                f"(vae.subfolder={subfolder!r}); point it at a diffusers autoencoder folder"
            )
        try:
            return json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise AutoencoderError(
                f"vae.pretrained={pretrained!r}: {folder / 'config.json'} is not JSON: {e}"
            ) from None
    from diffusers import AutoencoderKL  # any ModelMixin: load_config reads its config.json, whatever the class

    try:
        return dict(AutoencoderKL.load_config(pretrained, subfolder=subfolder))
    except Exception as e:  # noqa: BLE001 - diffusers raises OSError/EnvironmentError/HTTP errors here
        raise AutoencoderError(
            f"vae.pretrained={pretrained!r} is not a local folder and could not be loaded as a "
            f"hub id: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def load_autoencoder(
    pretrained: str | None,
    subfolder: str | None = None,
    dtype: str = "float32",
    normalization: str = "auto",
    stats: dict | str | None = None,
    shift=None,
    scale=None,
    sha256: str | None = None,
    device: str | torch.device = "cpu",
    measure_stats: bool = False,
    **_ignored,
) -> Autoencoder:
    """Load the diffusers autoencoder at `pretrained` (folder or hub id), frozen, in eval mode.

    `stats`: per-channel {"mean", "std"} of the raw latents, or a path to a cache's info.json holding them.
    `shift`/`scale`: a normalisation resolved before (a checkpoint's or an export's), used as given.
    `sha256`: the weights hash recorded with a cache, checkpoint or export; a different autoencoder is refused.
    `measure_stats`: the caller measures the data's statistics itself (stale-encode, which stores raw moments): a
    normalisation that needs them and has no `stats` is left unresolved (shift and scale None) instead of refused.
    """
    if not pretrained:
        raise AutoencoderError("vae.pretrained is not set: a diffusers autoencoder folder or hub id")
    if dtype not in DTYPES:
        raise AutoencoderError(f"vae.dtype={dtype!r} is not one of {tuple(DTYPES)}")
    pretrained = str(pretrained)
    config = _read_config(pretrained, subfolder)
    cls = config.get("_class_name")
    if cls not in CLASSES:
        raise AutoencoderError(
            f"vae.pretrained={pretrained!r}: _class_name={cls!r} in its config.json is not one of {CLASSES}"
        )
    import diffusers

    try:
        model = getattr(diffusers, cls).from_pretrained(
            pretrained, subfolder=subfolder, torch_dtype=DTYPES[dtype], low_cpu_mem_usage=False
        )
    except Exception as e:  # noqa: BLE001 - missing or damaged weights
        raise AutoencoderError(
            f"vae.pretrained={pretrained!r}: {cls} weights do not load: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    digest = weights_sha256(model)
    if sha256 and sha256 != digest:
        raise AutoencoderError(
            f"vae.pretrained={pretrained!r} holds other weights (sha256 {digest[:12]}...) than "
            f"the ones recorded (sha256 {sha256[:12]}...)"
        )
    if isinstance(stats, (str, Path)):
        stats = read_stats(stats)
    local = Path(pretrained).expanduser()
    source = {
        "pretrained": str(local.resolve()) if local.exists() else pretrained,
        "subfolder": subfolder,
        "dtype": dtype,
        "sha256": digest,
    }
    ae = Autoencoder(model, cls, source, shift, scale, normalization, stats, measure_stats)
    return ae.to(device)


def read_stats(path: str | Path) -> dict:
    """Per-channel {"mean", "std"} of raw latents from a cache's info.json (stale-encode) or a stats file."""
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AutoencoderError(f"vae.stats={str(path)!r} cannot be read: {e}") from None
    stats = info.get("stats", info)
    if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
        raise AutoencoderError(f"vae.stats={str(path)!r} has no per-channel mean and std")
    return stats


UNIFORM_SCALE = math.sqrt(3.0)  # U[-a, a] has variance a^2 / 3: a = sqrt(3) matches unit-variance latents
