"""Graph exports of one velocity evaluation v(x_t, t, y): a torch.export program and ONNX.

The sampler loop, classifier-free guidance and the prior stay in Python (StalePipeline); the graph is the
part worth compiling: the denoiser. Inputs and outputs (batch B is dynamic; C, T, H, W are those of the
training clips, since the positional encoding is computed from them at trace time):

    x         float32 (B, C, T, H, W)   the state x_t, in [-1, 1] for the uniform prior
    t         float32 (B,)              flow time in [0, 1] (0 = prior, 1 = data)
    y         int64   (B,)              label; y = num_classes is the null label (unconditional)
    text      float32 (B, L, D_text)    model.cond=text only: the caption embeddings (int64 (B, L) token ids with
                                        a learned text encoder, which is then part of the graph); y is unused
    text_mask bool    (B, L)            model.cond=text only: True on real caption tokens
    velocity  float32 (B, C, T, H, W)   dx/dt

ONNX goes through the dynamo exporter (torch.onnx.export(dynamo=True), which needs `onnxscript`): the
TorchScript exporter has no symbolic for RMSNorm (the model's QK-norm).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stale.models.stale_transformer import SDPA_MAX_SEQUENCES

INPUT_NAMES = ("x", "t", "y")
TEXT_INPUT_NAMES = ("text", "text_mask")


def input_names(config) -> tuple[str, ...]:
    return INPUT_NAMES + (TEXT_INPUT_NAMES if config.cond == "text" else ())


OUTPUT_NAMES = ("velocity",)
MAX_BATCH = 4096  # upper bound of the dynamic batch dimension (torch.export needs one; ONNX keeps it symbolic)
ONNX_INLINE_LIMIT = 1 << 30  # weights above 1 GiB go to an external .onnx.data file (protobuf caps a file at 2 GiB)


class Denoiser(nn.Module):
    """The velocity output of a Stale model, for graph export (the hinge scores are dropped)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *text: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, y, *text)[0]


def example_inputs(config, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random (x, t, y) of the model's training clip shape; labels cycle through all classes and the null label.
    model.cond=text adds random captions and masks of varied lengths (text, text_mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, config.in_channels, config.frames, config.size, config.size, generator=g) * 2 - 1
    t = torch.rand(batch, generator=g)
    y = torch.arange(batch) % (config.num_classes + 1)
    if config.cond != "text":
        return x, t, y
    L = config.text_len
    text = (
        torch.randint(0, config.text_vocab, (batch, L), generator=g)
        if config.text_vocab
        else torch.randn(batch, L, config.text_dim, generator=g)
    )
    mask = torch.arange(L)[None] < torch.randint(1, L + 1, (batch, 1), generator=g)
    return x, t, y, text, mask


@contextlib.contextmanager
def quiet_exporters():
    """The exporters log every graph rewrite at INFO (shown by Hydra's console logging), warn that torchvision
    is missing (its ops are not used here) and hit a torch-internal pytree deprecation: keep their warnings,
    drop that noise."""
    levels = {
        "onnxscript": logging.WARNING,
        "onnx_ir": logging.WARNING,
        "torch.onnx._internal.exporter._registration": logging.ERROR,
    }
    old = {name: logging.getLogger(name).level for name in levels}
    try:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for name, level in old.items():
            logging.getLogger(name).setLevel(level)


def max_batch(config) -> int:
    """The dynamic batch's upper bound: at most MAX_BATCH, and small enough that every attention call stays
    below SDPA_MAX_SEQUENCES sequences (B T' spatial, B (H'W' + 1) temporal), so that the model's split branch
    is statically dead and torch.export does not have to guard on `B x sequences <= SDPA_MAX_SEQUENCES`."""
    pt, ph, pw = config.patch
    per_clip = max(config.frames // pt, (config.size // ph) * (config.size // pw) + 1)
    return max(2, min(MAX_BATCH, SDPA_MAX_SEQUENCES // per_clip))


def export_program(model: nn.Module, batch: int = 2) -> torch.export.ExportedProgram:
    """torch.export the denoiser with a dynamic batch dimension shared by x, t and y."""
    if batch < 2:
        raise ValueError(f"batch={batch}: trace with batch >= 2, or torch.export specialises the batch to 1")
    denoiser = Denoiser(model).eval()
    b = torch.export.Dim("batch", min=1, max=max_batch(model.config))
    dynamic = {"x": {0: b}, "t": {0: b}, "y": {0: b}}
    if model.config.cond == "text":
        dynamic["text"] = ({0: b}, {0: b})  # Denoiser's *text: (text, text_mask)
    with torch.no_grad(), quiet_exporters():
        return torch.export.export(denoiser, example_inputs(model.config, batch), dynamic_shapes=dynamic)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    batch: int = 2,
    opset: int | None = None,
    program: torch.export.ExportedProgram | None = None,
) -> Path:
    """Write the denoiser as ONNX (one file unless the weights exceed ONNX_INLINE_LIMIT)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's op library)
    except ImportError as err:
        raise ImportError("onnx=true needs the `onnx` and `onnxscript` packages (pip install onnx onnxscript)") from err
    path = Path(path)
    program = program or export_program(model, batch)
    n_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    with quiet_exporters():
        onnx_program = torch.onnx.export(
            program,
            input_names=list(input_names(model.config)),
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        onnx_program.save(str(path), external_data=n_bytes > ONNX_INLINE_LIMIT)
    return path


def check_onnx(path: str | Path, model: nn.Module, batches: tuple[int, ...] = (1, 3), seed: int = 1) -> float:
    """Run the ONNX file in onnxruntime on fresh inputs of several batch sizes; max |onnx - torch| (fp32)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    denoiser, worst = Denoiser(model).eval(), 0.0
    for b in batches:
        inputs = example_inputs(model.config, b, seed=seed + b)
        with torch.no_grad():
            ref = denoiser(*inputs).cpu().numpy()
        feed = {name: v.numpy() for name, v in zip(input_names(model.config), inputs)}
        (out,) = session.run(list(OUTPUT_NAMES), feed)
        if out.shape != ref.shape:
            raise AssertionError(f"{path}: onnxruntime returned shape {out.shape} for batch {b}, expected {ref.shape}")
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst
