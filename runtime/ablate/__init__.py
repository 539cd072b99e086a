"""`grapefx ablate`: a variant x seed matrix trained, evaluated and reported the same way for every run.

    matrix.py    the matrix file, run specs, the fairness check        (data: Matrix, Variant, Run, Change)
    runner.py    plan, train, evaluate (runtime.evaluation), the command
    report.py    report.md / report.json / figures, from the run folders' records (no training code)
    spectrum.py  the learned GRAPE-M frequencies
"""
