"""Attention kernels behind one dispatch, each checked against the dense-mask SDPA reference."""
