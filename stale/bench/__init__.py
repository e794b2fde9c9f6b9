"""stale-bench sections: each module measures one thing and returns rows.

A section is a module with `run(...)`; `stale-bench sections=train,sampler out=bench.json` imports only the
selected modules and collects their results into one JSON document (stale.bench.report). The registry below is the only list
of sections.

Shared helpers for the sections live here too: device choice, model building from the packaged model
configs (so a bench model of size `s` is the model `stale-train model=s` trains), step timing and
synthetic in-memory batches.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

# section name -> module. Each module exposes run(...) returning a dict with "rows" (or a list of rows).
SECTIONS: dict[str, str] = {
    "train": "stale.bench.train",  # Lightning step vs plain PyTorch loop: framework overhead
    "data": "stale.bench.data",  # loader clips/s vs raw PyAV decode; data wait per step
    "attention": "stale.bench.attention",  # alternating vs full attention as T grows
    "sampler": "stale.bench.sampler",  # sampling time / (steps x one forward)
    "memory": "stale.bench.memory",  # peak memory per clip, with and without gradient checkpointing
    "gpu": "stale.bench.gpu",  # tokens/s and MFU (CUDA only)
    "cpu": "stale.bench.cpu",  # threads and torch.compile for the default run's step (CPU only)
    "contamination": "stale.bench.contamination",  # near-duplicate search speed (not in the default list)
    "parallel": "stale.bench.parallel",  # sequence parallelism over gloo processes: time, memory, volume (not default)
    "latent": "stale.bench.latent",  # encode speed, cache bytes, latent vs pixel step (needs stale[latent]; not default)
    "buckets": "stale.bench.buckets",  # bucketed vs padded/cropped training tokens/s; bucketed loader vs raw decode (not default)
    "peer": "stale.bench.peer",  # training step vs diffusers' LatteTransformer3DModel at matched size (not default)
    "pretrained": "stale.bench.pretrained",  # a Wan backbone: stale's adapter step vs the bare diffusers module (not default)
    "pos": "stale.bench.pos",  # sin-cos vs resolution-scaled sin-cos vs 3D RoPE: loss at trained/unseen shapes, steps/s (not default)
}


class SectionError(ValueError):
    """An unknown section name; the message lists the known ones."""


def parse_sections(sections: str | list | tuple) -> list[str]:
    """`train,sampler` or ["train", "sampler"] -> ["train", "sampler"], checked against SECTIONS."""
    names = sections.split(",") if isinstance(sections, str) else list(sections)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise SectionError(f"sections={sections!r} selects nothing; known sections: {', '.join(SECTIONS)}")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SectionError(f"unknown section(s) {unknown} in sections={sections!r}; known: {', '.join(SECTIONS)}")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def call_with_supported(fn: Callable, kwargs: dict[str, Any], **extra) -> Any:
    """Call fn(**kwargs, **extra), passing an `extra` item only when fn's signature accepts it.

    The data and attention sections are written by others; the bench passes them what they declare.
    """
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in extra.items() if takes_any or k in params}
    return fn(**{**extra, **kwargs})


# --------------------------------------------------------------------------- devices, models, batches


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here")
    return str(device)


def packaged_conf(*parts: str) -> Path:
    """A file of the packaged configs: conf/<parts> of the source tree, or the package stale.conf when installed."""
    path = Path(__file__).resolve().parents[2] / "conf" / Path(*parts)
    if not path.is_file():  # installed (non-editable): conf/ is the package stale.conf
        import stale.conf

        path = Path(stale.conf.__file__).parent / Path(*parts)
    return path


def model_kwargs(name: str, **overrides) -> dict:
    """patch/pattern of `stale-train model=<name>` (read from the packaged conf/model/<name>.yaml)."""
    from omegaconf import OmegaConf

    path = packaged_conf("model", f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"model size {name!r} has no config {path}")
    node = OmegaConf.load(path)
    out = {"patch": list(node.get("patch", [1, 2, 2])), "pattern": list(node.get("pattern", ["spatial", "temporal"]))}
    out.update(overrides)
    return out


def build(name: str, frames: int, image: int, num_classes: int = 4, **overrides):
    """build_model(name) for clips of `frames` x `image` x `image`, with the patch of its packaged config."""
    from stale.models import build_model

    return build_model(name, **model_kwargs(name, frames=frames, size=image, num_classes=num_classes, **overrides))


def random_batches(
    n: int,
    batch_size: int,
    frames: int,
    image: int | tuple[int, int],
    num_classes: int = 4,
    seed: int = 0,
    channels: int = 3,
) -> list:
    """n pre-decoded uint8 batches (B, C, T, H, W) + int64 labels: what the loader ships, held in memory.
    image: H = W, or (H, W) for a clip that is not square."""
    import torch

    h, w = (image, image) if isinstance(image, int) else image
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 256, (batch_size, channels, frames, h, w), generator=g, dtype=torch.uint8),
            torch.randint(0, num_classes, (batch_size,), generator=g),
        )
        for _ in range(n)
    ]


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable, device: str, n: int = 1) -> float:
    """Wall seconds of one of n calls of fn() in a row (their mean), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def take_turns(variants: dict[str, Callable], rounds: int, device: str = "cpu", n: int = 1) -> dict[str, list]:
    """{name: seconds of one call per round}: each round times n calls of every variant in turn (timed), the order
    rotating, so that a change in the machine's load reaches all of them alike."""
    names, times = list(variants), {name: [] for name in variants}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(variants[name], device, n))
    return times


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to n (None: left as they are) inside, and given back after."""
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield previous
    finally:
        torch.set_num_threads(previous)


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> float:
    """Half the inter-quartile range relative to the median: a robust noise figure for timings."""
    xs = sorted(xs)
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return float((q[2] - q[0]) / 2 / statistics.median(xs))


def machine_info(device: str) -> dict:
    """What the numbers were measured on, including the load average: this machine may be shared."""
    import lightning
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return info


def run_bench(cfg, command: str = "") -> dict:
    """Run the selected sections of a composed `bench` config; write JSON to cfg.out; print the table."""
    from omegaconf import OmegaConf

    from stale.bench import report

    names = parse_sections(cfg.sections)  # fails before measuring anything
    modules = {name: importlib.import_module(SECTIONS[name]) for name in names}
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.get("device", "auto"))
    doc = {
        "machine": machine_info(device),
        "command": command,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "sections": {},
    }
    for name, module in modules.items():
        node = cfg.get(name)  # sections without a node in conf/bench.yaml (data, attention) run their defaults
        kwargs = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        t0 = time.perf_counter()
        result = report.normalise(call_with_supported(module.run, kwargs, device=device, seed=cfg.get("seed", 0)))
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        doc["sections"][name] = result
        print(report.section_table(name, result), flush=True)
    if hasattr(os, "getloadavg"):
        doc["machine"]["loadavg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    report.write_json(cfg.out, doc)
    print(f"\nstale-bench: wrote {cfg.out}")
    return doc
