"""Hand-written kernels for what XLA does poorly on a backend (today: fused attention on CPU)."""
