"""ELF Lab pipelines: Ray drivers and MLflow wiring (train, evaluate, data preparation).

Everything that knows about Ray or MLflow lives here; ``elf_core`` never imports either.
"""
