"""`accel models`: the model presets with their sizes, parameter counts computed from the spec."""

from __future__ import annotations

import argparse
import json

from accel.commands._common import table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets with parameter counts",
                       description="List the model presets (real sizes and tiny test sizes).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def run(args: argparse.Namespace) -> int:
    from accel.models import presets

    records = []
    for name, cls in presets().items():
        model = cls.preset(name)
        records.append({"preset": name, "model_type": cls.model_type, "parameters": model.num_parameters(),
                        "layers": model.num_layers, "hidden_size": model.hidden_size, "vocab_size": model.vocab_size})
    if args.json:
        print(json.dumps({"models": records}, indent=2))
        return 0
    rows = [[r["preset"], r["model_type"], _human(r["parameters"]), f"{r['parameters']:,}", r["layers"],
             r["hidden_size"], r["vocab_size"]] for r in records]
    print(table(rows, ["preset", "model_type", "params", "exact", "layers", "hidden", "vocab"]))
    return 0
