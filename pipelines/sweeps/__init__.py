"""Frontier sweeps and scaling ablations as a library: typed settings (``settings``), search spaces
(``space``), the Ray Tune trial (``trial``), Pareto sets and the "best" rule (``pareto``), tables and
plots (``plot``), one sweep (``run``) and the ablation over model sizes (``ablation``)."""
