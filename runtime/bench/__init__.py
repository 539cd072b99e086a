"""`grapefx bench`: the same model run five ways on the same batches, timed (installed with grapefx).

    ways.py             the runner: builds each way, times training steps, writes the JSON and tables
    flex.py             the ``flex`` way: FlexAttention in place of the fused attention op
    reference_model.py  the ``reference`` way: the same model written by hand

The scripts in the repository's ``bench/`` folder (GPU checks, kernel timings) import from here.
"""

from runtime.bench.ways import RUN_ORDER, WAYS, environment, format_table, kernel_group, matmul_peak, run_bench

__all__ = ["WAYS", "RUN_ORDER", "run_bench", "kernel_group", "format_table", "matmul_peak", "environment"]
