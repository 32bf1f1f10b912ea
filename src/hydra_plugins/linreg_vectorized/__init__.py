"""linreg's vectorized launcher: `hydra/launcher=vectorized` trains each group of a sweep as one stacked model."""
