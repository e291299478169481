"""Runnable examples and experiments on zo_kernels (the paper toys).  Run from the repository root,
with the package importable (installed, or on PYTHONPATH):

    python -m python.least_squares        # MeZO-SVRG paper, Fig. 1a: least squares
    python -m python.mlp_digits           # MLP on sklearn's digits

Shared pieces (methods, training loop with query counts, CSV and plots) are in python/_zo_toys.py.
"""
