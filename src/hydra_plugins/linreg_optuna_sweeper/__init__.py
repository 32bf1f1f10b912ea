"""linreg's Optuna sweeper: hydra-optuna-sweeper's config on a current Optuna, the study in a database."""
