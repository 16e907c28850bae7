"""Evaluation of checkpoints with the paper's metrics: the session (``session``: model, encoder and
evaluator loaded once), its inputs (``inputs``: sampling lists, references, samples files), sharded
sampling on Ray (``shards``), the MLflow record of one evaluation (``records``), the two commands
(``runner``) and the names they are asked for by (``choices``)."""
