"""One interleaved run: stale, stale without QK-norm, without the joy token, without both, and diffusers' Latte
(same batch and step as `stale-bench sections=peer`). The no-joy rows need docs/bench/peer_no_joy.patch applied
(it drops the joy token; not in the tree):

    git apply docs/bench/peer_no_joy.patch && .venv/bin/python docs/bench/peer_decomposition.py tiny 30; git apply -R ...
"""
import sys, json, torch
from stale.bench.peer import latte_model, _Step, flow_batch, median, spread
from stale.bench import build, random_batches
case, rounds = sys.argv[1], int(sys.argv[2])  # tiny | s, timed rounds
if case == "tiny": model, frames, size, bs, ov = "tiny", 8, 16, 8, {}
else: model, frames, size, bs, ov = "s", 16, 32, 1, {"depth": 4}
steps = {}
for name, qk, nojoy in (("stale", True, False), ("no_qk", False, False), ("no_joy", True, True), ("no_joy_no_qk", False, True)):
    torch.manual_seed(0)
    m = build(model, frames, size, prediction="velocity", qk_norm=qk, **ov)
    m.nojoy = nojoy
    steps[name] = _Step(m, (lambda m: lambda xt, t, y: m(xt, t, y)[0])(m))
cfg = m.config
latte = latte_model(cfg.dim, cfg.depth, cfg.heads, cfg.patch[1], cfg.in_channels, frames, size)
cap = torch.randn(bs, 1, cfg.dim)
steps["latte"] = _Step(latte, lambda xt, t, y: latte(xt, timestep=t*1000, encoder_hidden_states=cap, return_dict=False)[0])
batch = flow_batch(*random_batches(1, bs, frames, size, cfg.num_classes, seed=0, channels=cfg.in_channels)[0], 0)
for _ in range(3):
    for s in steps.values(): s(batch)
T = {k: [] for k in steps}
for r in range(rounds):
    for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
        T[k].append(steps[k](batch))
out = {"case": f"{case} {frames}x{size}x{size} b{bs}", "rounds": rounds, "threads": torch.get_num_threads(), "rows": []}
for k in T:
    rat = [a / b for a, b in zip(T[k], T["latte"])]
    out["rows"].append({"model": k, "step_ms": round(1e3 * median(T[k]), 2), "over_latte": round(median(rat), 3), "spread": round(spread(rat), 3)})
print(json.dumps(out))
