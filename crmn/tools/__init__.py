"""Developer tools behind ``run_experiments.sh profile`` and ``bench --sampler``: timing
code kept out of the backends and the data pipeline (each imports its framework when run)."""
