"""stale-bench output: one JSON document and a plain-text table per section.

JSON layout (keys every consumer may rely on):

    {
      "machine":  {platform, python, torch, lightning, cpu_count, torch_threads, device, device_name,
                   loadavg_1_5_15, loadavg_1_5_15_end},
      "command":  the command line,
      "config":   the composed bench config,
      "sections": {<name>: {"rows": [ {column: value, ...}, ... ],   # what the table prints
                            "summary": {...},                       # headline numbers and targets
                            "notes": ["what was measured and how", ...],
                            "wall_s": seconds the section took}}
    }

A row value that was not measured is the string "not measured (<why>)", never a made-up number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def normalise(result: Any) -> dict:
    """Section results come as {"rows": [...], ...}, a bare list of rows, or one flat dict (one row)."""
    if isinstance(result, list):
        return {"rows": [dict(r) for r in result], "summary": {}, "notes": []}
    if isinstance(result, dict):
        if "rows" in result:
            out = dict(result)
            out["rows"] = [dict(r) for r in result["rows"]]
        else:
            out = {
                "rows": [{k: v for k, v in result.items() if not isinstance(v, (list, dict))}],
                "details": {k: v for k, v in result.items() if isinstance(v, (list, dict))},
            }
        out.setdefault("summary", {})
        out.setdefault("notes", [])
        return out
    raise TypeError(f"a bench section returned {type(result).__name__}; expected a dict or a list of rows")


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(_fmt(x) for x in v) if all(isinstance(x, int) for x in v) else json.dumps(v)
    return str(v)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Fixed-width text table of the rows (columns: union of keys, in first-seen order)."""
    if not rows:
        return "  (no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  " + "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    sep = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def section_table(name: str, result: dict) -> str:
    parts = [f"\n== {name} " + "=" * max(0, 70 - len(name))]
    parts.append(table(result.get("rows", [])))
    summary = result.get("summary") or {}
    if summary:
        parts.append("  summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    for note in result.get("notes") or []:
        parts.append(f"  note: {note}")
    return "\n".join(parts)


def _jsonable(v: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become null; tuples become lists."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def write_json(path: str | Path, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    return path
