"""moe_runtime: run Mixture-of-Experts decoders with experts offloaded to host memory.

The executor half of the project. The simulator (``simulator/``) imports the
policies defined here; nothing here imports the simulator.
"""

__version__ = "0.1.0"
