"""Samplers for the flow ODE dx/dt = v(x, t), from t=0 (prior) to t=1 (data).

In the style of k-diffusion's sampling.py: small pure functions with one shared signature,

    sampler(velocity, x, ts, clamp=True, progress=False) -> x at ts[-1]

where `velocity(x, t)` takes x (B, ...) and t (B,) and returns dx/dt, and `ts` is an increasing time grid
(`time_grid(steps)`). They are deterministic: the same x and ts give the same result.

Two rules shared by every sampler:
- Clamping. With the uniform prior the exact field is discontinuous at the faces of the box [-1, 1]^d,
  so steps can leave the support: `clamp=True` projects every step *and every stage* back onto [-1, 1]
  (a discretised reflected process, METHOD.md). Use clamp=False for the Gaussian prior.
- No evaluation at t = 1. The exact field v*(x, t) = (E[x1 | x_t] - x) / (1 - t) is 0/0 there, and
  models rarely see t near 1 in training. A last step that ends at t = 1 therefore uses a method whose
  stages stop short of it (Heun: Euler, as k-diffusion's sample_heun does at sigma = 0; RK4: Ralston's
  third-order method). Each of those is one step of one order less, which keeps the global order.
  An Euler step to t = 1 lands exactly on the clean estimate x1_hat = x + (1 - t) v.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from stale.diffusion.flow import shift_time

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, device=None) -> torch.Tensor:
    """steps + 1 evenly spaced times from 0 to 1."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


# diffusers' flow schedulers whose sigma grid stale reproduces, and each one's key for a fixed shift
SCHEDULER_SHIFT = {"FlowMatchEulerDiscreteScheduler": "shift", "UniPCMultistepScheduler": "flow_shift"}
# scheduler options that change the grid in ways stale does not reproduce: refused rather than silently ignored
UNSUPPORTED_SCHEDULER_KEYS = (
    "invert_sigmas",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)
PIPELINE_SIGMAS = (None, "linear")  # the pipeline's `sigmas` argument: none (WanPipeline) | linspace(1, 1/n, n) (LTX)


def calculate_shift(tokens: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """The dynamic shift mu of a clip of `tokens` tokens: linear in the token count, base_shift at base_seq_len and
    max_shift at max_seq_len (diffusers' pipelines/ltx/pipeline_ltx.py calculate_shift, as in Flux)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return tokens * slope + base_shift - slope * base_seq_len


def _check_scheduler(scheduler: dict) -> str:
    """The scheduler's class name, or a one-line error naming the key that stale's grid cannot follow."""
    name = scheduler.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name not in SCHEDULER_SHIFT or (name == "UniPCMultistepScheduler" and not scheduler.get("use_flow_sigmas")):
        raise ValueError(
            f"sample.scheduler: _class_name={name!r} is not a flow-matching scheduler stale follows; supported: "
            "FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler with use_flow_sigmas=true (e.g. {shift: 3.0})"
        )
    refused = [k for k in UNSUPPORTED_SCHEDULER_KEYS if scheduler.get(k)]
    if scheduler.get("final_sigmas_type", "zero") != "zero":
        refused.append("final_sigmas_type")
    if refused:
        raise ValueError(
            f"sample.scheduler: {refused[0]}={scheduler[refused[0]]!r} is not supported; supported: "
            f"{SCHEDULER_SHIFT[name]}, use_dynamic_shifting (base_shift, max_shift, base_image_seq_len, "
            f"max_image_seq_len, time_shift_type), shift_terminal, num_train_timesteps, sigmas {list(PIPELINE_SIGMAS)}"
        )
    if scheduler.get("sigmas") not in PIPELINE_SIGMAS:
        raise ValueError(f"sample.scheduler.sigmas={scheduler['sigmas']!r} is not one of {list(PIPELINE_SIGMAS)}")
    if scheduler.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ValueError(
            f"sample.scheduler.time_shift_type={scheduler['time_shift_type']!r} is not one of ['exponential', 'linear']"
        )
    return name


def read_scheduler(spec, key: str = "sample.scheduler") -> dict | None:
    """A scheduler spec as a plain, checked scheduler config (what scheduler_times takes), or None (stale's grid).

    `spec` is None, or a mapping of scheduler_config.json keys, optionally with `pretrained` (a hub id, a folder or
    its scheduler_config.json) and `subfolder` (e.g. scheduler): that config is read with diffusers' own
    ConfigMixin.load_config (the hub cache, offline) and the mapping's other keys go over it, so
    {pretrained: REPO, subfolder: scheduler, sigmas: linear} is LTXPipeline's grid. The result names no file, so a
    checkpoint or an export that holds it samples the same way on any machine. Errors name `key`."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{key}={spec!r} must be null or a mapping (e.g. {{pretrained: REPO, subfolder: scheduler}})")
    spec = dict(spec)
    source, subfolder = spec.pop("pretrained", None), spec.pop("subfolder", None)
    config = {}
    if source is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        try:  # load_config reads scheduler_config.json whatever the class; the class is checked below
            config = dict(FlowMatchEulerDiscreteScheduler.load_config(str(source), subfolder=subfolder))
        except (OSError, ValueError) as e:
            where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
            raise ValueError(f"{key}.pretrained: no scheduler_config.json in {where}: {e}") from None
    config = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    config.update(spec)
    try:
        name = _check_scheduler(config)
    except ValueError as e:
        raise ValueError(str(e).replace("sample.scheduler", key, 1)) from None
    import diffusers  # a misspelt key would otherwise leave the grid at its default

    allowed = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"} | {
        "sigmas",
        "_class_name",
    }
    unknown = sorted(set(spec) - allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f"; did you mean {key}.{close[0]}?" if close else ""
        raise ValueError(f"unknown config key {key}.{unknown[0]}: {name} takes {', '.join(sorted(allowed))}{hint}")
    return config


def scheduler_times(steps: int, scheduler: dict, tokens: int, device=None) -> torch.Tensor:
    """stale's time grid (steps + 1,), t = 1 - sigma, of a diffusers flow scheduler, so that generate() integrates
    on the family's own grid (its diffusers pipeline's: WanPipeline's, LTXPipeline's).

    `scheduler` is the scheduler's config (its scheduler_config.json keys; missing keys take its defaults) plus one
    key of stale's, `sigmas`: the pipeline's `sigmas` argument to set_timesteps, None (WanPipeline passes none) or
    "linear" (linspace(1, 1/n, n): LTXPipeline, HunyuanVideoPipeline, FluxPipeline). `tokens`: the clip's tokens
    T' H' W' as the transformer sees them (LTXPipeline's video_sequence_length; its patch is 1).

    The sigmas follow diffusers 0.42's set_timesteps (schedulers/scheduling_flow_match_euler_discrete.py and, for
    the Wan hub repositories' default, scheduling_unipc_multistep.py with use_flow_sigmas):
    - Without the pipeline's sigmas, FlowMatchEulerDiscreteScheduler takes linspace(sigma_max N, sigma_min N, n) / N
      (N = num_train_timesteps), whose ends come from __init__'s training sigmas i / N, i = N..1, shifted by `shift`
      unless use_dynamic_shifting (so a fixed shift moves sigma_min, and is applied again below);
      UniPCMultistepScheduler takes linspace(1, 1 / N, n + 1)[:-1].
    - The shift: fixed, s sigma / (1 + (s - 1) sigma) (s = shift, UniPC's flow_shift), or dynamic (time_shift):
      e^mu / (e^mu + (1 / sigma - 1)) ("exponential") or mu / (mu + (1 / sigma - 1)) ("linear"), with
      mu = calculate_shift(tokens, ...) as the dynamic pipelines compute it.
    - shift_terminal (LTX-Video 0.9.1+): stretch_shift_to_terminal scales 1 - sigma so the last sigma is it.
    - UniPC moves a first sigma of 1 to 1 - 1e-6; both append a final sigma = 0.
    The family's Euler step x + (sigma' - sigma) prediction is stale's x + (t' - t) v (v = -prediction), so
    sample_euler on this grid takes FlowMatchEulerDiscreteScheduler's steps (on UniPC's grid it is Euler, not UniPC).
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    name = _check_scheduler(scheduler)
    n_train = int(scheduler.get("num_train_timesteps", 1000))
    shift = float(scheduler.get(SCHEDULER_SHIFT[name], 1.0))
    dynamic = bool(scheduler.get("use_dynamic_shifting", False))
    terminal = scheduler.get("shift_terminal")
    if terminal and steps == 1:  # the stretch divides by 1 - sigma_last = 0 (diffusers returns nan)
        raise ValueError(f"steps=1 with sample.scheduler.shift_terminal={terminal}: use steps >= 2")
    if scheduler.get("sigmas") == "linear":
        sigmas = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64)  # (n,)
    elif name == "UniPCMultistepScheduler":
        sigmas = torch.linspace(1.0, 1 / n_train, steps + 1, dtype=torch.float64)[:-1]  # (n,)
    else:  # __init__'s sigma_min: 1 / N, shifted unless dynamic, a float32 item of its torch sigmas
        low = 1 - shift_time(torch.tensor(1 - 1 / n_train, dtype=torch.float64), 1.0 if dynamic else shift)
        sigmas = torch.linspace(n_train, low.float().item() * n_train, steps, dtype=torch.float64) / n_train  # (n,)
    if dynamic:
        mu = calculate_shift(
            tokens,
            scheduler.get("base_image_seq_len", 256),
            scheduler.get("max_image_seq_len", 4096),
            scheduler.get("base_shift", 0.5),
            scheduler.get("max_shift", 1.15),
        )
        shift = math.exp(mu) if scheduler.get("time_shift_type", "exponential") == "exponential" else mu
    # every shift here is SD3's s sigma / (1 + (s - 1) sigma) (flow.shift_time in t): the fixed one with s = shift,
    # time_shift's e^mu / (e^mu + 1 / sigma - 1) with s = e^mu, its "linear" mu / (mu + 1 / sigma - 1) with s = mu
    sigmas = 1 - shift_time(1 - sigmas, shift)
    if terminal:  # stretch_shift_to_terminal, in t = 1 - sigma: t * (1 - terminal) / t_last
        sigmas = 1 - (1 - sigmas) * (1 - terminal) / (1 - sigmas[-1])
    if name == "UniPCMultistepScheduler" and abs(sigmas[0].item() - 1) < 1e-6:
        sigmas[0] -= 1e-6
    sigmas = sigmas.float()  # float32, as the schedulers keep them
    return torch.cat([1 - sigmas, torch.ones(1)]).to(device)  # (n + 1,): the final sigma = 0 is t = 1


def _project(x: torch.Tensor, clamp: bool) -> torch.Tensor:
    return x.clamp(-1.0, 1.0) if clamp else x


def _steps(ts: torch.Tensor, progress: bool, desc: str):
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
    # the bar stays on screen when done: its final count shows the sampler finished
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc=desc):
        yield ts[i], ts[i + 1] - ts[i], bool(ts[i + 1] >= 1)


def _v(velocity: Velocity, x: torch.Tensor, t) -> torch.Tensor:
    return velocity(x, torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0]))


@torch.no_grad()
def sample_euler(
    velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, clamp: bool = True, progress: bool = False
) -> torch.Tensor:
    """Explicit Euler, first order: x <- x + h v(x, t). One velocity evaluation per step."""
    for t, h, _ in _steps(ts, progress, "euler"):
        x = _project(x + h * _v(velocity, x, t), clamp)
    return x


@torch.no_grad()
def sample_heun(
    velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, clamp: bool = True, progress: bool = False
) -> torch.Tensor:
    """Heun's method (explicit trapezoid), second order; two evaluations per step (Karras et al. 2022,
    Alg. 1). The last step to t = 1 is an Euler step, so the singular endpoint is never evaluated."""
    for t, h, last in _steps(ts, progress, "heun"):
        d = _v(velocity, x, t)
        x_euler = _project(x + h * d, clamp)
        if last:
            x = x_euler
            continue
        d2 = _v(velocity, x_euler, t + h)
        x = _project(x + h * (d + d2) / 2, clamp)
    return x


@torch.no_grad()
def sample_rk4(
    velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, clamp: bool = True, progress: bool = False
) -> torch.Tensor:
    """Classical Runge-Kutta, fourth order; four evaluations per step. The last step to t = 1 uses
    Ralston's third-order method (stages at t, t + h/2, t + 3h/4; Ralston 1962), which never evaluates t=1."""
    for t, h, last in _steps(ts, progress, "rk4"):
        k1 = _v(velocity, x, t)
        k2 = _v(velocity, _project(x + h / 2 * k1, clamp), t + h / 2)
        if last:
            k3 = _v(velocity, _project(x + 3 * h / 4 * k2, clamp), t + 3 * h / 4)
            x = _project(x + h * (2 * k1 + 3 * k2 + 4 * k3) / 9, clamp)
            continue
        k3 = _v(velocity, _project(x + h / 2 * k2, clamp), t + h / 2)
        k4 = _v(velocity, _project(x + h * k3, clamp), t + h)
        x = _project(x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6, clamp)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "rk4": sample_rk4}
EVALS_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}  # velocity evaluations per step (cost)


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sample.sampler={name!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
