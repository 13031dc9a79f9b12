"""A picture of one run's lineage: dataset commit → run → checkpoints → registered versions → endpoints.

No graphviz: the layout is five columns, drawn as hand-written SVG (also embedded
in a standalone HTML page with the facts beside it) or as PNG through matplotlib. It sits
with the MLflow code because the sink process logs it (``oxen/lineage.svg``); the CLI
draws it too (``oxen-callbacks lineage --graph``)::

    from oxen_callbacks._mlflow.picture import write_graph
    write_graph(view, "lineage.svg")     # view: a lineage record + "registered" + "endpoints"
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._util.terminal import printable_value
from ..errors import ConfigurationError
from ..names import TAG_MODEL_COMMIT

FORMATS = ("svg", "html", "png")
MAX_CHECKPOINTS = 10
_W, _H, _GAP_X, _GAP_Y, _MARGIN, _TITLE = 240, 58, 56, 14, 20, 34
_CHARS = 30  # per line of a box
_COLORS = {"dataset": "#dbeafe", "run": "#fef3c7", "checkpoint": "#e5e7eb", "model": "#bbf7d0",
           "version": "#e9d5ff", "endpoint": "#fecaca", "more": "#f9fafb"}
_COLUMNS = ("dataset", "run", "checkpoint", "version", "endpoint")


@dataclass
class Node:
    key: str
    kind: str
    lines: list[str]
    x: float = 0.0
    y: float = 0.0

    def __post_init__(self) -> None:
        self.lines = [_fit(_drawable(line)) for line in self.lines]


def _drawable(text: str) -> str:
    """``text`` (a record's, anyone's) with control characters escaped: XML forbids most of them, so an
    SVG holding one is no picture at all."""
    return printable_value(str(text))


def _paths_text(dataset: dict[str, Any]) -> str:
    """The dataset's paths, or that they are not listed (a record rebuilt from tags that only count them)."""
    paths = dataset.get("paths")
    return ", ".join(str(p) for p in paths) if isinstance(paths, list) else "paths not listed"


def _fit(text: str, width: int = _CHARS) -> str:
    """``text`` shortened in the middle to fit a box."""
    if len(text) <= width:
        return text
    keep = width - 3
    return text[: keep - keep // 2] + "..." + text[-(keep // 2):]


@dataclass
class Layout:
    title: str
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0


def _short(commit: str | None, n: int = 12) -> str:
    return (commit or "pending")[:n]


def layout(view: dict[str, Any]) -> Layout:
    """Place the nodes of ``view`` in columns (see the module docstring)."""
    run = view["run"]
    out = Layout(title=_drawable(f"Lineage of run {run.get('name') or run.get('mlflow_run_id') or 'run'}"))
    columns: dict[str, list[Node]] = {k: [] for k in _COLUMNS}
    _add_dataset_and_run(view, columns, out)
    by_commit = _add_checkpoints(view, columns, out)
    _add_versions_and_endpoints(view, by_commit, columns, out)
    _place(columns, out)
    return out


def _add_dataset_and_run(view: dict[str, Any], columns: dict[str, list[Node]], out: Layout) -> None:
    run, dataset = view["run"], view.get("dataset")
    if dataset:
        columns["dataset"].append(Node("dataset", "dataset", [
            f"dataset {Path(str(dataset['repo'])).name}", f"commit {_short(dataset['commit'])}",
            _paths_text(dataset)]))
        out.edges.append(("dataset", "run"))
    code = (view.get("code") or {}).get("git_commit")
    mlflow_id = run.get("mlflow_run_id")
    columns["run"].append(Node("run", "run", [
        f"run {run.get('name') or mlflow_id or 'run'}", f"mlflow {_short(mlflow_id, 10)}" if mlflow_id else "no MLflow run",
        f"code {_short(code, 10)}" if code else "code: not in git"]))


def _add_checkpoints(view: dict[str, Any], columns: dict[str, list[Node]], out: Layout) -> dict[str, str]:
    """The checkpoint column; returns commit -> the node drawn for it (the model's, when it is one)."""
    model = view["model"]
    shown = _pick_checkpoints(view["checkpoints"], model)
    if not shown and model.get("commit"):
        shown = [{"commit": model["commit"], "path": model["path"] or ""}]
    by_commit: dict[str, str] = {}
    for i, ckpt in enumerate(shown):
        is_model = ckpt["path"] == model.get("path") and ckpt["commit"] == model.get("commit")
        where = " ".join(f"{k} {ckpt[k]}" for k in ("epoch", "step") if ckpt.get(k) is not None)
        columns["checkpoint"].append(Node(f"ckpt{i}", "model" if is_model else "checkpoint", [
            ("model: " if is_model else "") + Path(ckpt["path"]).name, f"commit {_short(ckpt['commit'])}", where]))
        out.edges.append(("run", f"ckpt{i}"))
        if ckpt["commit"] and (is_model or ckpt["commit"] not in by_commit):
            by_commit[ckpt["commit"]] = f"ckpt{i}"
    hidden = len(view["checkpoints"]) - len(shown)
    if hidden > 0:
        columns["checkpoint"].append(Node("more", "more", [f"+{hidden} more checkpoints", "", ""]))
    return by_commit


def _add_versions_and_endpoints(view: dict[str, Any], by_commit: dict[str, str], columns: dict[str, list[Node]],
                                out: Layout) -> None:
    model = view["model"]
    version_of: dict[str, str] = {}  # commit -> its first registered version's node
    for i, version in enumerate(view.get("registered") or []):
        aliases = ", ".join(version.get("aliases") or [])
        commit = (version.get("tags") or {}).get(TAG_MODEL_COMMIT) or model.get("commit")
        columns["version"].append(Node(f"v{i}", "version", [
            f"{version['name']} v{version['version']}", f"@{aliases}" if aliases else "registered",
            f"commit {_short(commit)}"]))
        out.edges.append((by_commit.get(commit, "run"), f"v{i}"))
        version_of.setdefault(commit, f"v{i}")
    for i, endpoint in enumerate(view.get("endpoints") or []):
        commit, name = endpoint.get("model_commit"), endpoint["endpoint"]
        columns["endpoint"].append(Node(f"e{i}", "endpoint", [
            name, f"serves {_short(commit)}" if commit else "serves this run",
            endpoint.get("deployed_at") or ""]))
        out.edges.append((version_of.get(commit) or by_commit.get(commit, "run"), f"e{i}"))


def _place(columns: dict[str, list[Node]], out: Layout) -> None:
    """Size the picture and give each node its place: used columns left to right, each centred."""
    tallest = max(len(c) for c in columns.values())
    used = [k for k in _COLUMNS if columns[k]]
    out.width = 2 * _MARGIN + len(used) * _W + (len(used) - 1) * _GAP_X
    out.height = _TITLE + 2 * _MARGIN + tallest * _H + (tallest - 1) * _GAP_Y
    for col, kind in enumerate(used):
        nodes = columns[kind]
        top = _TITLE + _MARGIN + (tallest - len(nodes)) * (_H + _GAP_Y) / 2
        for row, node in enumerate(nodes):
            node.x, node.y = _MARGIN + col * (_W + _GAP_X), top + row * (_H + _GAP_Y)
            out.nodes.append(node)


def _pick_checkpoints(checkpoints: list[dict[str, Any]], model: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's checkpoint and the latest others, at most ``MAX_CHECKPOINTS``, in save order."""
    if len(checkpoints) <= MAX_CHECKPOINTS:
        return list(checkpoints)
    chosen = {i for i, c in enumerate(checkpoints) if c["path"] == model.get("path") and c["commit"] == model.get("commit")}
    for i in range(len(checkpoints) - 1, -1, -1):
        if len(chosen) >= MAX_CHECKPOINTS:
            break
        chosen.add(i)
    return [checkpoints[i] for i in sorted(chosen)]


def to_svg(view: dict[str, Any]) -> str:
    g = layout(view)
    where = {n.key: n for n in g.nodes}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{g.width:.0f}" height="{g.height:.0f}" '
             f'viewBox="0 0 {g.width:.0f} {g.height:.0f}" font-family="Helvetica, Arial, sans-serif">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{_MARGIN}" y="{_MARGIN + 8}" font-size="16" font-weight="bold">{html.escape(g.title)}</text>']
    for a, b in g.edges:
        s, t = where[a], where[b]
        x1, y1, x2, y2 = s.x + _W, s.y + _H / 2, t.x, t.y + _H / 2
        mid = (x1 + x2) / 2
        parts.append(f'<path d="M {x1:.1f} {y1:.1f} C {mid:.1f} {y1:.1f}, {mid:.1f} {y2:.1f}, {x2:.1f} {y2:.1f}" '
                     'fill="none" stroke="#555" stroke-width="1.3" marker-end="url(#arrow)"/>')
    for n in g.nodes:
        parts.append(f'<rect x="{n.x:.1f}" y="{n.y:.1f}" width="{_W}" height="{_H}" rx="8" fill="{_COLORS[n.kind]}" '
                     'stroke="#374151" stroke-width="1"/>')
        for i, line in enumerate(n.lines):
            weight = ' font-weight="bold"' if i == 0 else ""
            parts.append(f'<text x="{n.x + 10:.1f}" y="{n.y + 18 + i * 16:.1f}" font-size="12"{weight}>'
                         f"{html.escape(line)}</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def to_html(view: dict[str, Any]) -> str:
    """A standalone page: the picture, then the commits and checkpoints as a table."""
    dataset, model, code = view.get("dataset"), view["model"], view.get("code") or {}
    facts = [("MLflow run", view["run"].get("mlflow_run_id")), ("run", view["run"].get("name")),
             ("dataset", f"{dataset['repo']} @ {dataset['commit']} ({_paths_text(dataset)})" if dataset else None),
             ("model", f"{model['repo']} @ {model['commit']} ({model['path']})"),
             ("code", f"git {code.get('git_commit')} (dirty: {code.get('git_dirty')})")]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_drawable(v))}</td></tr>" for k, v in facts if v)
    ckpts = "".join(
        f"<tr><td>{html.escape(_drawable(c['commit']))}</td><td>{html.escape(_drawable(c['path']))}</td><td>{html.escape(_drawable(c.get('step')))}</td>"
        f"<td>{html.escape(_drawable(c.get('epoch')))}</td><td>{'yes' if c.get('kept', True) else 'rotated out'}</td></tr>"
        for c in view["checkpoints"])
    title = html.escape(layout(view).title)
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:Helvetica,Arial,sans-serif;margin:24px}table{border-collapse:collapse;margin:12px 0}"
            "td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;font-size:13px}</style></head><body>\n"
            f"{to_svg(view)}<table>{rows}</table>\n<table><tr><th>commit</th><th>checkpoint</th><th>step</th>"
            f"<th>epoch</th><th>kept</th></tr>{ckpts}</table>\n</body></html>\n")


def to_png(view: dict[str, Any], path: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    g = layout(view)
    where = {n.key: n for n in g.nodes}
    fig = plt.figure(figsize=(g.width / 100, g.height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, g.width)
    ax.set_ylim(g.height, 0)
    ax.axis("off")
    ax.text(_MARGIN, _MARGIN + 8, _literal(g.title), fontsize=12, fontweight="bold", va="baseline")
    for a, b in g.edges:
        s, t = where[a], where[b]
        ax.add_patch(FancyArrowPatch((s.x + _W, s.y + _H / 2), (t.x, t.y + _H / 2), arrowstyle="-|>",
                                     mutation_scale=10, color="#555", linewidth=1.1,
                                     connectionstyle="arc3,rad=0"))
    for n in g.nodes:
        ax.add_patch(FancyBboxPatch((n.x, n.y), _W, _H, boxstyle="round,pad=0,rounding_size=8",
                                    facecolor=_COLORS[n.kind], edgecolor="#374151", linewidth=1))
        for i, line in enumerate(n.lines):
            ax.text(n.x + 10, n.y + 18 + i * 16, _literal(line), fontsize=8.5, va="baseline",
                    fontweight="bold" if i == 0 else "normal")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _literal(text: str) -> str:
    """``text`` as matplotlib draws it literally: ``$...$`` would be parsed as math (a name can hold it)."""
    return text.replace("$", r"\$")


def render(view: dict[str, Any], fmt: str) -> str:
    """The picture as SVG or HTML text."""
    return {"svg": to_svg, "html": to_html}[fmt](view)


def write_graph(view: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the picture; the format follows the extension (.svg, .html, .png)."""
    target = Path(path)
    fmt = target.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigurationError(f"--graph {str(path)!r}: cannot draw a {target.suffix or 'suffix-less'} file.",
                                 "end the file name with .svg, .html or .png.")
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        to_png(view, target)
    else:
        target.write_text(render(view, fmt))
    return target
