"""ELF Lab experiments: YAML configs, sweep spaces (``sweeps/``) and the sweep / ablation launchers."""
