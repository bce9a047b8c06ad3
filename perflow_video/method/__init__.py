"""The PeRFlow method as pure torch functions (docs/method.md): time windows, the teacher's noise
schedule, the parameterizations A / B / velocity, the teacher's window solve, the reflow objective
(Algorithm 1) and its fixed-draw evaluation. Imports nothing of this package outside ``method``.
"""
