"""How requests reach Triton. Only this package imports tritonclient."""
