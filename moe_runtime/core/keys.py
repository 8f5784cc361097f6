"""The name of one expert everywhere in the project: (MoE layer, expert id), MoE layers numbered
0..n_moe_layers-1 over the MoE layers only, as the traces number them."""

Key = tuple[int, int]  # (MoE layer, expert id)
