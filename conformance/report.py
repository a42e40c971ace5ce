"""Reports under reports/<timestamp>/ and reports/latest/: report.json (every row), report.md (the
summary table) and a self-contained report.html with PNG plots embedded as data URIs: the target x
case matrix, error per layer of the model cases, and loss curves per target of the training cases."""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from accel.conformance.cases import STATUSES, Row
from accel.conformance.runner import HEADER, summary_rows

COLORS = {"pass": "#2e7d32", "fail": "#c62828", "known-failure": "#ef6c00", "skipped": "#9e9e9e",
          "crashed": "#6a1b9a", "timeout": "#4527a0"}


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from accel import __version__

    versions = {"accel-port": __version__, "python": platform.python_version(), "numpy": np.__version__}
    # from the installed distributions' metadata: importing each framework would cost seconds per run
    for module, distribution in (("torch", "torch"), ("mindspore", "mindspore"), ("jax", "jax"),
                                 ("onnxruntime", "onnxruntime"), ("tvm", "apache-tvm")):
        try:
            versions[module] = version(distribution)
        except PackageNotFoundError:  # not part of this environment
            continue
    return {"versions": versions, "machine": platform.machine(), "system": platform.system(),
            "node": platform.node()}


def counts(rows: list[Row]) -> dict[str, int]:
    return {s: sum(r.status == s for r in rows) for s in STATUSES}


def time_per_target(rows: list[Row]) -> str:
    """'torch:cpu 31 s (ops 2, inference 9, ...); ...': where a run's time went."""
    spent: dict[str, dict[str, float]] = {}
    for r in rows:
        kinds = spent.setdefault(r.target, {})
        kinds[r.case] = kinds.get(r.case, 0.0) + r.seconds
    return "; ".join(f"{t} {sum(k.values()):.0f} s (" + ", ".join(f"{c} {s:.0f}" for c, s in k.items()) + ")"
                     for t, k in spent.items())


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def matrix(rows: list[Row]) -> tuple[list[str], list[str], list[list[str]]]:
    """targets x case kinds, each cell the worst status of its rows."""
    order = ("crashed", "timeout", "fail", "known-failure", "pass", "skipped")
    targets = list(dict.fromkeys(r.target for r in rows))
    kinds = list(dict.fromkeys(r.case for r in rows))
    cells = []
    for t in targets:
        line = []
        for k in kinds:
            statuses = [r.status for r in rows if r.target == t and r.case == k]
            line.append(min(statuses, key=order.index) if statuses else "")
        cells.append(line)
    return targets, kinds, cells


def plots(rows: list[Row]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    out = {}
    targets, kinds, cells = matrix(rows)
    if targets and kinds:
        names = list(COLORS)
        grid = np.array([[names.index(c) if c else -1 for c in line] for line in cells], dtype=float)
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(kinds), 0.8 + 0.5 * len(targets)))
        ax.imshow(np.ma.masked_less(grid, 0), cmap=ListedColormap(list(COLORS.values())), vmin=0,
                  vmax=len(names) - 1, aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set_yticks(range(len(targets)), targets)
        for i, line in enumerate(cells):
            for j, c in enumerate(line):
                ax.text(j, i, c, ha="center", va="center", color="white", fontsize=8)
        ax.set_title("target x case (worst status)")
        out["matrix"] = _png(fig)
    layer_rows = [r for r in rows if r.series.get("layer_max_abs")]
    if layer_rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for r in layer_rows:
            ax.semilogy(range(len(r.series["layer_max_abs"])), np.maximum(r.series["layer_max_abs"], 1e-18),
                        marker="o", label=f"{r.target} {r.model} {r.dtype}")
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("max abs error vs float64")
        ax.set_title("error per layer (inference)")
        ax.legend(fontsize=6, ncol=2)
        out["layers"] = _png(fig)
    loss_rows = [r for r in rows if r.series.get("loss")]
    if loss_rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for r in loss_rows:
            ax.plot(range(1, len(r.series["loss"]) + 1), r.series["loss"], marker=".", label=f"{r.target} {r.model}")
            if r.series.get("reference_loss"):
                ax.plot(range(1, len(r.series["reference_loss"]) + 1), r.series["reference_loss"], "k--", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss per target (dashed: reference)")
        ax.legend(fontsize=6, ncol=2)
        out["loss"] = _png(fig)
    return out


def _html(rows: list[Row], meta: dict[str, Any]) -> str:
    images = plots(rows)
    c = counts(rows)
    targets, kinds, cells = matrix(rows)
    esc = html.escape
    head = "".join(f"<th>{esc(k)}</th>" for k in kinds)
    body = "".join(
        f"<tr><th>{esc(t)}</th>" + "".join(f'<td class="{s}">{esc(s)}</td>' for s in line) + "</tr>"
        for t, line in zip(targets, cells))
    table_rows = "".join(
        "<tr>" + "".join(f'<td class="{esc(cell)}">{esc(cell)}</td>' if i == 7 else f"<td>{esc(cell)}</td>"
                         for i, cell in enumerate(line)) + "</tr>" for line in summary_rows(rows))
    failures = [r for r in rows if r.first_divergence]
    div_rows = "".join(
        f"<tr><td>{esc(r.target)}</td><td>{esc(r.case)}</td><td>{esc(r.model)}</td><td>{esc(r.dtype)}</td>"
        f"<td>{esc(str(r.first_divergence.get('tap')))}</td><td>{esc(str(r.first_divergence.get('op')))}</td>"
        f"<td>{esc(str(r.first_divergence.get('detail', '')))}</td></tr>" for r in failures if r.first_divergence)
    style = "".join(f"td.{k}{{background:{v};color:white}}" for k, v in COLORS.items())
    imgs = "".join(f'<figure><img alt="{k}" src="{v}"></figure>' for k, v in images.items())
    versions = ", ".join(f"{k} {v}" for k, v in meta["environment"]["versions"].items())
    title = f"accel-port conformance {esc(meta['created'])}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}{style}figure{{display:inline-block;margin:1em}}</style>
</head><body><h1>Conformance report</h1>
<p>{esc(meta['created'])} &middot; {meta['seconds']:.0f} s &middot; {esc(versions)}</p>
<p>{' &middot; '.join(f'{k}: {v}' for k, v in c.items())}</p>
<p>Seconds per target and case kind: {esc(time_per_target(rows))}</p>
<h2>Target &times; case</h2><table id="matrix"><tr><th></th>{head}</tr>{body}</table>
<h2>Plots</h2>{imgs}
<h2>First divergences</h2><table><tr><th>target</th><th>case</th><th>model</th><th>dtype</th><th>tap</th><th>op</th>
<th>detail</th></tr>{div_rows}</table>
<h2>Summary</h2><table><tr>{''.join(f'<th>{h}</th>' for h in HEADER)}</tr>{table_rows}</table>
</body></html>"""


def write(rows: list[Row], report_dir: Path, meta: dict[str, Any]) -> Path:
    """Writes the three reports into report_dir/<timestamp>/ and mirrors them into report_dir/latest/."""
    from accel.commands._common import table

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    meta = {"created": stamp, "environment": environment(), **meta}
    out = report_dir / stamp
    suffix = 1
    while out.exists():
        out, suffix = report_dir / f"{stamp}-{suffix}", suffix + 1
    out.mkdir(parents=True)
    doc = {**meta, "counts": counts(rows), "rows": [r.as_dict() for r in rows]}
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=float))
    md = [f"# Conformance report {stamp}", "", f"Targets: {', '.join(meta.get('targets', []))}. "
          f"{meta['seconds']:.0f} s.", "", " · ".join(f"{k}: {v}" for k, v in counts(rows).items()), "",
          "Seconds per target and case kind: " + time_per_target(rows), "", "```",
          table(summary_rows(rows), HEADER), "```", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(rows, {**meta, "seconds": meta["seconds"]}))
    latest = report_dir / "latest"
    if latest.is_symlink() or latest.is_file():
        latest.unlink()
    elif latest.exists():
        shutil.rmtree(latest)
    shutil.copytree(out, latest)
    return out
