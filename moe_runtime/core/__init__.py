"""The torch-free core both halves stand on: keys, options, budgets, eviction policies, the expert
cache, the per-layer protocol, the host tier, the predictor registry with the trace-based predictors,
model shapes (HF config parsing, the families table, expert format sizes), and the small utilities
they share (errors, config files, atomic outputs, resource checks, timelines).

Nothing in this package imports torch or any other part of the project: the executor
(``moe_runtime.model``, ``offload``, ...) and the simulator import it, never the reverse.
"""
