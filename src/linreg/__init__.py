"""linreg: the PyTorch linear-regression tutorial as a Lightning + Hydra project."""
