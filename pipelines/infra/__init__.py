"""Infrastructure shared by every entry point: the Ray environment (``ray_env``), storage locations
(``filesystems``: local paths and object-store URIs alike; ``storage``: the multi-node shared-storage
check), where outputs go (``paths``), the one progress reporter (``progress``), and the CPU training
workers' malloc settings (``host_memory``)."""
