"""moe-offload's discrete-event simulator: replays routing traces on modelled devices with simpy.

Modules: ``device`` (DeviceSpec YAML), ``cost_model`` (roofline compute time),
``replay`` (the simpy replay), ``bounds`` (all-resident and best-possible
times), ``sweep`` (experiment grids), ``plots``, ``cli`` (``moe-sim``). The
simulator imports the runtime's cache, policies and predictors; the runtime
never imports the simulator.
"""
