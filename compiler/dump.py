"""Graph dumps users read: code, node tables, the pass report, a drawn graph.

``write_dumps(folder, model, report, batch, seq_len)`` writes

    lowered.py    readable code of each distinct block graph as lowered, with the layers running it
    lowered.txt   node tables of the same graphs: name, op, target, shape, dtype
    fused.py      the same after the fusion passes (only when passes ran)
    fused.txt
    passes.json   {pass_name: {"matches": n, "layers": [...], ...}}, layers counted from 1
    passes.md     the same for people, with why a pass matched nothing
    graph.html    each distinct block graph drawn (inline SVG, no Graphviz), fused nodes marked

Shapes come from fake tensors for a (batch, seq_len) input: nothing runs, any model size is cheap,
and the model may live on the meta device (no weights), as ``grapefx compile`` builds it when it
does not compile.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Sequence

import networkx as nx
import torch
from tabulate import tabulate
from torch import fx

from compiler.passes import PASSES, block_example_inputs, layers_text
from compiler.passes.match import ATTENTION, attention_args, is_custom, layer_prefix, propagate
from compiler.pipeline import BlockGroup, BuildReport

__all__ = ["write_dumps", "write_inductor_index", "node_table", "graph_svg"]


# ----------------------------------------------------------------------------- text
def _target(node: fx.Node) -> str:
    if node.op == "call_function":
        t = node.target
        if isinstance(t, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
            return str(t).replace("torch.ops.", "").replace(".default", "")
        return (fx.node._get_qualified_name(t).replace("torch._C._nn.", "torch.nn.functional.")
                .replace("_operator.", "operator."))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "get_attr":
        return node.target
    return ""


def _shape_dtype(node: fx.Node) -> tuple[str, str]:
    """(shape, dtype) of a node as text, from its ``meta["val"]``."""
    return _describe(node.meta.get("val"))


def _describe(v) -> tuple[str, str]:
    """'(2, 64, 32)' 'float32' for a tensor; '64' 'int' for a size; '(2, 64, 32)' 'size' for a shape;
    the parts of a tuple of tensors joined by ';'."""
    if isinstance(v, (tuple, list)) and v and all(type(x) is int for x in v):
        return str(tuple(v)), "size"
    if isinstance(v, (tuple, list)):
        parts = [_describe(x) for x in v]
        return "; ".join(p[0] for p in parts), "; ".join(p[1] for p in parts)
    if isinstance(v, torch.Tensor):
        return str(tuple(v.shape)), str(v.dtype).replace("torch.", "")
    if isinstance(v, (bool, int, float)):
        return str(v), type(v).__name__
    return "", ""


def node_table(gm: fx.GraphModule) -> str:
    """name | op | target | shape | dtype, one row per node (``meta["val"]`` gives shape and dtype)."""
    rows = []
    for n in gm.graph.nodes:
        shape, dtype = _shape_dtype(n)
        fused = " *" if n.meta.get("grapefx_fused") else ""
        rows.append((n.name + fused, n.op, _target(n), shape, dtype))
    return tabulate(rows, headers=("name", "op", "target", "shape", "dtype"), tablefmt="simple")


def _graph_header(title: str, group: BlockGroup, n_nodes: int) -> str:
    rest = group.layers_1based[1:]
    verb = "runs" if len(rest) == 1 else "run"
    also = f"; {layers_text(rest)} {verb} the same graph with their own parameters" if rest else ""
    return (f"# {'=' * 94}\n# {title} `{group.label}`: {layers_text(group.layers_1based)} "
            f"(shown as layer {group.layers_1based[0]}{also}); {n_nodes} nodes\n# {'=' * 94}\n")


def _code(gm: fx.GraphModule) -> str:
    return gm.code.strip("\n") + "\n"


def _write_code_and_tables(folder: Path, stem: str, title: str, graphs: Sequence[fx.GraphModule],
                           groups: Sequence[BlockGroup], extra: Sequence[tuple[str, fx.GraphModule]], intro: str) -> None:
    code, tables = [intro], [intro]
    for group in groups:
        gm = graphs[group.layers[0]]
        header = _graph_header(title, group, len(gm.graph.nodes))
        code.append(header + _code(gm))
        tables.append(header + node_table(gm) + "\n")
    for name, gm in extra:
        header = f"# {'=' * 94}\n# {name} graph; {len(gm.graph.nodes)} nodes\n# {'=' * 94}\n"
        code.append(header + _code(gm))
        tables.append(header + node_table(gm) + "\n")
    (folder / f"{stem}.py").write_text("\n\n".join(code))
    (folder / f"{stem}.txt").write_text("\n\n".join(tables))


def _passes_md(report: BuildReport, spec_name: str, graphs: Sequence[fx.GraphModule]) -> str:
    p = report.passes
    lines = [f"# Fusion passes: {spec_name}", "",
             f"Passes run, in order: {', '.join(p.order) if p.order else 'none (--no-passes)'}. "
             f"Layers are counted from 1; {p.n_layers} layers, {len(report.groups)} distinct block graphs.", "",
             "| pass | matches | layers | nodes removed / added |", "| --- | --- | --- | --- |"]
    for name, e in p.entries.items():
        layers = layers_text(e.layers).split(" ", 1)[1] if e.layers else "-"
        layers = "head" if e.graph == "head" and e.matches else layers
        lines.append(f"| `{name}` | {e.matches} | {layers} | -{e.nodes_removed} / +{e.nodes_added} |")
    lines.append("")
    for name, e in p.entries.items():
        doc = sys.modules[PASSES[name].run.__module__].__doc__ or ""
        lines += [f"## `{name}`", "", doc.strip().split("\n\n")[0].replace("\n", " "), ""]
        if PASSES[name].needs:
            lines += [f"Needs `{PASSES[name].needs}` before it.", ""]
        if e.matches:
            where = "the head graph" if e.graph == "head" else layers_text(e.layers)
            lines.append(f"Matched {e.matches} time{'s' if e.matches != 1 else ''}: {where}.")
        else:
            lines.append(f"**Matched nothing**: {e.why_nothing()}.")
        if e.reasons and e.enabled and not e.skipped:
            lines += ["", "Where it did not match, and why:", ""]
            lines += [f"- {layers_text(ls) if e.graph == 'block' else 'head'}: {r}" for r, ls in e.reasons.items()]
        lines.append("")
    lines += ["## Block graphs after the passes", ""]
    for g in report.groups:
        lines.append(f"- `{g.label}`: {layers_text(g.layers_1based)}")
        lines += [f"  - `{call}`" for call in _attention_calls(graphs[g.layers[0]])]
    return "\n".join(lines) + "\n"


def _attention_calls(gm: fx.GraphModule) -> list[str]:
    """``attention(q, k, v, theta=layer1_attn_theta, slopes=None, window=16, scale=0.25)`` per fused node."""
    out = []
    for n in gm.graph.nodes:
        if is_custom(n, ATTENTION):
            a = attention_args(n)
            text = lambda x: x.name if isinstance(x, fx.Node) else (f"{x:.6g}" if isinstance(x, float) else str(x))
            out.append(f"{n.name} = grapefx.attention(q, k, v, "
                       + ", ".join(f"{k}={text(a[k])}" for k in ("theta", "slopes", "window", "scale", "bias")) + ")")
    return out


# ----------------------------------------------------------------------------- drawing
_STYLE = {  # op -> (fill, stroke)
    "placeholder": ("#dbeafe", "#1d4ed8"), "output": ("#dbeafe", "#1d4ed8"), "get_attr": ("#f3f4f6", "#9ca3af"),
    "call_function": ("#ffffff", "#374151"), "call_method": ("#ffffff", "#6b7280"),
}
_CUSTOM = ("#fef9c3", "#a16207")           # grapefx ops
_FUSED = ("#fed7aa", "#c2410c")            # nodes a fusion pass made or rewrote
ROW, CHAR, PAD, BOX_H, GAP = 74, 6.6, 14, 38, 18


def _label(node: fx.Node, prefix: str) -> tuple[str, str]:
    name = node.name[len(prefix):] if prefix and node.name.startswith(prefix) else node.name
    return name, (_target(node) or node.op)


def graph_svg(gm: fx.GraphModule) -> str:
    """The graph as an inline SVG: one row per dependency depth, nodes ordered to cut crossings."""
    g = nx.DiGraph()
    nodes = list(gm.graph.nodes)
    for n in nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    depth: dict[fx.Node, int] = {}
    for n in nx.topological_sort(g):                                   # longest path from an input
        depth[n] = max((depth[a] + 1 for a in g.predecessors(n)), default=0)
    for n in nodes:                                                     # state sits just above its first use
        if n.op == "get_attr" and g.out_degree(n):
            depth[n] = min(depth[u] for u in g.successors(n)) - 1
    rows: dict[int, list[fx.Node]] = {}
    for n in nodes:
        rows.setdefault(depth[n], []).append(n)
    prefix = layer_prefix(gm)
    width = {n: max(len(s) for s in _label(n, prefix)) * CHAR + 2 * PAD for n in nodes}
    x: dict[fx.Node, float] = {}
    order = {d: list(r) for d, r in rows.items()}

    def place():
        for row in order.values():
            pos = 0.0
            for n in row:
                x[n] = pos + width[n] / 2
                pos += width[n] + GAP
            shift = pos / 2
            for n in row:
                x[n] -= shift
    place()
    for sweep in range(4):                                              # barycenter ordering
        for d in sorted(order, reverse=bool(sweep % 2)):
            nbrs = (lambda n: list(g.predecessors(n))) if sweep % 2 == 0 else (lambda n: list(g.successors(n)))
            order[d].sort(key=lambda n: sum(x[a] for a in nbrs(n)) / len(nbrs(n)) if nbrs(n) else x[n])
            place()
    lo = min(x[n] - width[n] / 2 for n in nodes) - 20
    hi = max(x[n] + width[n] / 2 for n in nodes) + 20
    top = min(depth.values())
    y = {n: (depth[n] - top) * ROW + 20 for n in nodes}
    H = max(y.values()) + BOX_H + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{hi - lo:.0f}" height="{H:.0f}" '
           f'viewBox="{lo:.0f} 0 {hi - lo:.0f} {H:.0f}" font-family="ui-monospace, monospace" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="6" markerHeight="6" '
           'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#9ca3af"/></marker></defs>']
    for a, b in g.edges:
        x1, y1, x2, y2 = x[a], y[a] + BOX_H, x[b], y[b]
        mid = (y1 + y2) / 2
        out.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}" '
                   'fill="none" stroke="#9ca3af" stroke-width="1" marker-end="url(#arrow)"/>')
    for n in nodes:
        fused = n.meta.get("grapefx_fused")
        custom = n.op == "call_function" and str(n.target).startswith("grapefx.")
        fill, stroke = _FUSED if fused else _CUSTOM if custom else _STYLE.get(n.op, ("#fff", "#000"))
        name, target = _label(n, prefix)
        shape, dtype = _shape_dtype(n)
        tip = f"{n.name}\n{n.op}: {_target(n)}\nshape: {shape}\ndtype: {dtype}"
        if fused:
            tip += "\nfused by: " + ", ".join(fused)
        w = width[n]
        out.append(f'<g><title>{html.escape(tip)}</title>'
                   f'<rect x="{x[n] - w / 2:.1f}" y="{y[n]:.1f}" width="{w:.1f}" height="{BOX_H}" rx="6" '
                   f'fill="{fill}" stroke="{stroke}" stroke-width="{2.5 if fused else 1}"/>'
                   f'<text x="{x[n]:.1f}" y="{y[n] + 15:.1f}" text-anchor="middle" font-weight="bold">'
                   f'{html.escape(name)}</text>'
                   f'<text x="{x[n]:.1f}" y="{y[n] + 29:.1f}" text-anchor="middle" fill="#4b5563">'
                   f'{html.escape(target)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def _graph_html(spec_name: str, report: BuildReport, fused: Sequence[fx.GraphModule],
                lowered: Sequence[fx.GraphModule] | None) -> str:
    legend = "".join(f'<span class="key" style="background:{f};border-color:{s}">{t}</span>' for t, (f, s) in (
        ("input / output", _STYLE["placeholder"]), ("parameter / buffer", _STYLE["get_attr"]),
        ("op", _STYLE["call_function"]), ("grapefx op", _CUSTOM), ("fused by a pass", _FUSED)))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>grapefx graphs: {html.escape(spec_name)}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#111}"
             ".scroll{overflow:auto;border:1px solid #e5e7eb;max-height:85vh;margin:8px 0 24px}"
             ".key{display:inline-block;border:1.5px solid;border-radius:6px;padding:2px 8px;margin-right:8px;"
             "font-size:13px}pre{background:#f9fafb;padding:8px}</style></head><body>",
             f"<h1>{html.escape(spec_name)}: block graphs</h1>",
             f"<p>{legend}</p><p>Hover a node for its full name, target, shape and dtype.</p>",
             "<pre>" + html.escape("\n".join(report.passes.summary_lines())) + "</pre>"]
    title = "after the fusion passes" if report.passes.order else "as lowered (no passes)"
    for group in report.groups:
        gm = fused[group.layers[0]]
        parts.append(f"<h2><code>{html.escape(group.label)}</code> {title}: {layers_text(group.layers_1based)}"
                     f" ({len(gm.graph.nodes)} nodes)</h2><div class='scroll'>{graph_svg(gm)}</div>")
    if lowered is not None and report.lowered_groups is not None and report.passes.order:
        for group in report.lowered_groups:
            gm = lowered[group.layers[0]]
            parts.append(f"<details><summary><code>{html.escape(group.label)}</code> as lowered (before the passes), "
                         f"{len(gm.graph.nodes)} nodes</summary><div class='scroll'>{graph_svg(gm)}</div></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- all of it
def write_dumps(folder: str | Path, model, report: BuildReport, *, batch: int, seq_len: int) -> list[Path]:
    """Write the dumps of ``model`` (built by ``build_model(..., keep_lowered=True)``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    lowered = report.lowered
    if lowered is None:
        raise ValueError("write_dumps needs the lowered graphs: build the model with keep_lowered=True")
    # shapes for the graphs shown: one per distinct block graph (``_write_code_and_tables``)
    for graphs, groups in ((lowered, report.lowered_groups), (model.layers, report.groups)):
        for i in (group.layers[0] for group in groups):
            propagate(graphs[i], *block_example_inputs(model, i, batch, seq_len))
    V, C = spec.model.padded_vocab_size, spec.model.d_model
    tokens = torch.empty(batch, seq_len, dtype=torch.int64, device="meta")
    propagate(model.embed, tokens)
    head_inputs = [torch.empty(batch, seq_len, C, dtype=model.compute_dtype, device="meta"), tokens]
    if spec.model.tied_embeddings:
        head_inputs.append(torch.empty(V, C, device="meta"))
    propagate(model.head, *head_inputs)
    extra = [("embedding", model.embed), ("head (final norm -> LM head -> cross-entropy)", model.head)]
    shapes = f"shapes for a batch of {batch} x {seq_len} tokens, compute dtype {report.compute_dtype}"
    intro = f"# grapefx: {spec.name}, {len(model.layers)} layers; {shapes}\n"
    _write_code_and_tables(folder, "lowered", "block graph", lowered, report.lowered_groups, extra,
                           intro + "# as lowered: reference math, before any fusion pass\n")
    written = [folder / n for n in ("lowered.py", "lowered.txt")]
    if report.passes.order:
        _write_code_and_tables(folder, "fused", "fused block graph", list(model.layers), report.groups, [],
                               intro + f"# after the passes {', '.join(report.passes.order)}; "
                                       "'*' in the tables marks nodes a pass made or rewrote\n")
        written += [folder / "fused.py", folder / "fused.txt"]
    (folder / "passes.json").write_text(json.dumps(report.passes_dict(), indent=2) + "\n")
    (folder / "passes.md").write_text(_passes_md(report, spec.name, list(model.layers)))
    (folder / "graph.html").write_text(_graph_html(spec.name, report, list(model.layers), lowered))
    return written + [folder / n for n in ("passes.json", "passes.md", "graph.html")]


def write_inductor_index(folder: str | Path, report: BuildReport) -> Path:
    """``DIR/inductor/INDEX.md``: which of Inductor's ``model__<k>_forward/backward`` trace folders is
    which graph. Dynamo numbers frames in the order they are first compiled: the block graphs in
    the order their first layer runs, then the head."""
    folder = Path(folder)
    names = [f"block graph `{g.label}` ({layers_text(g.layers_1based)})" for g in report.groups] + ["the head"]
    traces = sorted(p.name for p in folder.rglob("model__*") if p.is_dir())
    lines = ["# Inductor's generated code", "",
             "Each folder holds, for one compiled graph (forward or backward): `output_code.py` (the generated "
             "kernels and the code that calls them), `fx_graph_readable.py` / `fx_graph_transformed.py` (the "
             "aten graph before / after Inductor's own passes) and `ir_pre_fusion.txt` / `ir_post_fusion.txt`.", ""]
    for trace in traces:
        k = int(trace.split("__")[1].split("_")[0])
        lines.append(f"- `{trace}`: {names[k] if k < len(names) else 'another compiled graph'}")
    path = folder / "INDEX.md"
    path.write_text("\n".join(lines) + "\n")
    return path
