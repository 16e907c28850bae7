"""MLflow tracking for ELF Lab: ``store`` (where runs go, reachability), ``runs`` (the one run
lifecycle, params, tags, provenance), ``metrics`` (buffered logging), ``registry`` (checkpoints as
model versions), ``ui`` (links that open the model-training view)."""
