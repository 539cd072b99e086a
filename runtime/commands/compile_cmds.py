"""``grapefx compile SPEC [--dump DIR] [--no-passes | --passes a,b] [--inductor-code] [--no-compile] [--set k=v]``.

Builds the model as training would (lower -> fusion passes -> torch.compile per distinct block
graph), runs one forward + backward on a random batch so Inductor compiles, and prints the
compile time and a one-screen summary. ``--dump DIR`` writes what ``compiler.dump`` describes
(lowered.py/.txt, fused.py/.txt, passes.json, passes.md, graph.html); ``--inductor-code`` also
copies Inductor's generated code and its intermediate graphs into ``DIR/inductor/``, and compiles
even where the spec says ``compile.enabled: false`` (it asks for that code; with ``--no-compile``
it is refused).

Without the compile (``--no-compile`` or ``compile.enabled: false``) the model is lowered on the
meta device: the passes and the dumps need shapes, not weights, so any spec dumps in seconds and
a few hundred MB, whatever its size. The graphs use the training device's compute dtype.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from runtime.commands import add_overrides
from spec.errors import GrapefxError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compile", help="lower, fuse and compile a spec; dump the graphs",
        description="Lower SPEC to per-layer graphs, run the fusion passes, compile each distinct block graph "
                    "with Inductor (one forward + backward on a random batch) and print what happened. "
                    "--dump DIR writes the graphs before and after the passes, the pass report and a drawn graph.")
    p.add_argument("spec", metavar="SPEC", help="a YAML spec, e.g. examples/baseline.yaml")
    p.add_argument("--dump", metavar="DIR", help="write lowered/fused code, node tables, passes.json/.md, graph.html here")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--no-passes", action="store_true", help="run no fusion pass (the graphs as lowered)")
    group.add_argument("--passes", metavar="A,B", help="run these passes in this order instead of compile.passes")
    p.add_argument("--inductor-code", action="store_true",
                   help="also write Inductor's generated code into DIR/inductor/ (needs --dump; compiles even "
                        "where the spec has compile.enabled: false; bypasses the compile cache for this run so "
                        "the code is generated)")
    p.add_argument("--no-compile", action="store_true",
                   help="passes and dumps only, built on the meta device: no weights, seconds for any size "
                        "(same as --set compile.enabled=false)")
    p.add_argument("--batch", type=int, metavar="B", help="rows of the compile batch (default: train.micro_batch)")
    add_overrides(p, "model.n_layers=4", "one value")
    p.set_defaults(func=cmd_compile)


def _passes(args: argparse.Namespace, spec) -> list[str]:
    from compiler import check_pass_names

    if args.no_passes:
        return []
    if args.passes is not None:
        return check_pass_names([n.strip() for n in args.passes.split(",") if n.strip()], "--passes")
    return list(spec.compile.passes)


def cmd_compile(args: argparse.Namespace) -> int:
    import torch
    from torch._dynamo.utils import counters

    from compiler import ExpertGroup, build_model, compute_dtype, warm_up, write_dumps, write_inductor_index
    from runtime.device import pick_device
    from spec import load_spec
    from spec.report import human, summary_line

    if args.inductor_code and not args.dump:
        raise GrapefxError("--inductor-code: give --dump DIR as well; the generated code is written to DIR/inductor/")
    if args.inductor_code and args.no_compile:
        raise GrapefxError("--inductor-code asks for the code Inductor generates when it compiles, and --no-compile "
                           "turns the compile off: drop one of them")
    if args.batch is not None and args.batch < 1:
        raise GrapefxError(f"--batch: {args.batch} rows; the batch must have at least 1 row")
    overrides = list(args.overrides) + (["compile.enabled=false"] if args.no_compile else [])
    spec = load_spec(args.spec, overrides)
    compile_ = spec.compile.enabled or args.inductor_code
    if spec.parallel.expert > 1 and compile_:
        raise GrapefxError(f"parallel.expert: {spec.parallel.expert}: running the graphs of expert parallelism needs "
                           f"the job's processes (the experts are split over {spec.parallel.expert} ranks); add "
                           "--no-compile to write the dumps (the graphs of expert rank 0, with expert_dispatch and "
                           "expert_combine)")
    passes = _passes(args, spec)
    device = pick_device()
    batch, seq_len = args.batch or spec.train.micro_batch, spec.data.seq_len

    start = time.perf_counter()
    # parallel.expert > 1: the graphs of expert rank 0 (its slice of the experts, the dispatch ops)
    experts = ExpertGroup() if spec.parallel.expert > 1 else None
    if compile_:
        model, report = build_model(spec, device, compile=True, passes=passes, keep_lowered=bool(args.dump),
                                    experts=experts)
        where = f"built on {device} ({report.compute_dtype})"
    else:   # graphs and shapes only: parameters on the meta device, nothing allocated or initialised
        with torch.device("meta"):
            model, report = build_model(spec, "meta", compile=False, passes=passes, keep_lowered=bool(args.dump),
                                        compute=compute_dtype(spec, device), experts=experts)
        where = (f"lowered on the meta device (shapes only, no weights; compute dtype {report.compute_dtype} "
                 f"as on {device})")
    build_s = time.perf_counter() - start
    print(f"{args.spec}: {summary_line(spec)}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{where} in {build_s:.1f} s: {human(n_params)} parameters")
    print("\n".join(report.summary_lines()))
    print("passes: " + ("none" if not passes else ", ".join(passes)))
    print("\n".join("  " + line for line in report.passes.summary_lines()))
    if compile_ and not spec.compile.enabled:
        print("compile: on for --inductor-code (the spec has compile.enabled: false)")

    if report.compiled:
        patches = {}
        if args.inductor_code:
            folder = Path(args.dump) / "inductor"
            folder.mkdir(parents=True, exist_ok=True)
            patches = {"trace.enabled": True, "trace.debug_dir": str(folder), "force_disable_caches": True}
        before = dict(counters["inductor"])
        with torch._inductor.config.patch(patches):
            first = warm_up(model, batch, seq_len, device)
        second = warm_up(model, batch, seq_len, device)
        hits = counters["inductor"]["fxgraph_cache_hit"] - before.get("fxgraph_cache_hit", 0)
        misses = counters["inductor"]["fxgraph_cache_miss"] - before.get("fxgraph_cache_miss", 0)
        cache = "bypassed (--inductor-code)" if args.inductor_code else f"{hits} hit(s), {misses} miss(es)"
        print(f"compile: first forward+backward {first:.1f} s, the next {second:.2f} s -> compile time "
              f"~{max(first - second, 0.0):.1f} s for {len(report.groups)} block graph(s) + the head, batch "
              f"{batch} x {seq_len}; Inductor cache: {cache}")
    else:
        print("compile: off (--no-compile / compile.enabled: false)")
    if args.dump:
        written = write_dumps(args.dump, model, report, batch=batch, seq_len=seq_len)
        if args.inductor_code and report.compiled:
            written.append(write_inductor_index(Path(args.dump) / "inductor", report))
        print(f"dumps in {args.dump}: " + ", ".join(str(p.relative_to(args.dump)) for p in written))
    return 0
