"""Training on Ray Train: the run model (``run_model``: what a run name means on resubmission), the
driver (``driver``: checks, the TorchTrainer, registration, the summary) and the worker loop
(``worker``) with its checkpoint / probe helpers (``worker_state``)."""
