"""Fine-tuning a Stale Transformer: which tensors train (full, frozen by name, or LoRA adapters through peft).

    finetune=full                      every parameter trains (the default), except those matching `freeze`
    finetune=lora finetune.rank=8      peft LoRA adapters (Hu et al. 2021) on the blocks' attention and MLPs

Patterns are fnmatch patterns on full names (`blocks.*.attn.qkv`, `head.*`). Tensors that init_from could not fill
(a new label table, a new head) train whatever the mode: a frozen random layer is no use. Adapters live inside the
model (peft.inject_adapter_in_model), so it keeps its class, config and forward; merged() folds them back into a
plain model, adapter_state() / load_adapter() use peft's own file layout (docs/finetune.md).
"""

from __future__ import annotations

import copy
import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

MODES = ("full", "lora")
# LoRA's targets when finetune.target_modules is null: the model's own `lora_targets` (a pretrained family's
# attention and feed-forward projections), else the Stale Transformer's attention projections and MLPs
DEFAULT_TARGETS = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.0", "blocks.*.mlp.2")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class Finetune:
    """conf/finetune/*.yaml: what trains."""

    name: str = "full"  # full | lora
    # parameter-name patterns kept fixed (full); lora freezes all but adapters
    freeze: list = field(default_factory=list)
    rank: int = 8  # lora: r
    alpha: float = 8.0  # lora: the update is (alpha / rank) B A
    dropout: float = 0.0  # lora: dropout on the adapter's input
    target_modules: list | None = None  # lora: nn.Linear module patterns; None = the model's defaults
    # lora: parameter patterns that train too (e.g. y_embed.* for new classes)
    train: list = field(default_factory=list)

    def __post_init__(self):
        if self.name not in MODES:
            raise ValueError(f"finetune.name={self.name!r} is not one of {MODES}")
        self.freeze = list(self.freeze or [])
        self.target_modules = None if self.target_modules is None else list(self.target_modules)
        self.train = list(self.train or [])
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"finetune.rank={self.rank!r} must be an integer >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"finetune.dropout={self.dropout} must be in [0, 1)")
        if self.name == "lora" and self.target_modules is not None and not self.target_modules:
            raise ValueError("finetune.target_modules is empty: LoRA needs at least one module pattern")

    @property
    def lora(self) -> bool:
        return self.name == "lora"


def matching(names, patterns, what: str) -> list[str]:
    """The names matching any pattern; a pattern that matches nothing is an error naming it."""
    names = list(names)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"{what} pattern {pattern!r} matches nothing; names look like {names[:6]}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def require_peft() -> None:
    """peft is the `finetune` extra (it pulls in transformers and accelerate, which make train does not need)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError(
            "LoRA (finetune=lora, lora=ADAPTER, a LoRA checkpoint or export) needs peft: pip install 'stale[finetune]'"
        ) from None


def lora_config(ft: Finetune, targets: list[str]):
    require_peft()
    from peft import LoraConfig

    return LoraConfig(r=ft.rank, lora_alpha=ft.alpha, lora_dropout=ft.dropout, target_modules=targets, bias="none")


def apply_finetune(model: nn.Module, ft: Finetune, train_anyway: tuple = ()) -> nn.Module:
    """Set which parameters train, in place; inject LoRA adapters for finetune=lora. `train_anyway`: parameter
    names (before injection) that always train, e.g. the layers init_from reported as new or reshaped."""
    if ft.lora:
        require_peft()
        from peft import inject_adapter_in_model

        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        patterns = (
            ft.target_modules if ft.target_modules is not None else getattr(model, "lora_targets", DEFAULT_TARGETS)
        )
        targets = matching(linears, patterns, "finetune.target_modules")
        inject_adapter_in_model(lora_config(ft, targets), model)
        extra = set(matching([n for n, _ in model.named_parameters()], ft.train, "finetune.train"))
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name or name in extra)
    frozen = set(matching([n for n, _ in model.named_parameters()], ft.freeze, "finetune.freeze"))
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
        if base_name(name) in train_anyway:
            p.requires_grad_(True)
    return model


def base_name(name: str) -> str:
    """A parameter's name in the plain model: `blocks.0.attn.qkv.base_layer.weight` -> `blocks.0.attn.qkv.weight`."""
    return name.replace(".base_layer.", ".")


def has_adapters(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # adapters are peft layers: a process that never imported peft has none
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA adapter merged into its base layer (peft's merge) and unwrapped: a plain
    model whose state dict has the original names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, module.get_base_layer())
    return out


def unmerged_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `model` without its adapters, under the plain model's names (export with merge=false)."""
    return {base_name(k): v for k, v in model.state_dict().items() if ".lora_" not in k}


def adapted_modules(model: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def save_adapter(model: nn.Module, ft: Finetune, out: str | Path) -> dict[str, Path]:
    """Write the adapter in peft's layout: adapter_config.json (LoraConfig.save_pretrained) + adapter_model.safetensors."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    lora_config(ft, adapted_modules(model)).save_pretrained(str(out))
    return {"adapter_config": out / ADAPTER_CONFIG, "adapter_weights": out / ADAPTER_WEIGHTS}


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject the LoRA adapter saved in `folder` (save_adapter's layout) into `model`, in place, for inference."""
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    for f in (folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} does not exist: lora= must be an adapter folder written by "
                "stale-export merge=false (adapter_config.json + adapter_model.safetensors)"
            )
    config = LoraConfig.from_pretrained(str(folder))
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # a target module the model does not have
        raise ValueError(f"{folder}: the adapter does not fit this model: {err}") from None
    result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)))
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder}: adapter weights do not fit the model (missing {missing[:4]}, unexpected "
            f"{list(result.unexpected_keys)[:4]})"
        )
    return model.eval()
