"""Developer tools behind ``run_experiments.sh profile`` and ``bench --sampler``: timing
code kept out of the stacks and the data pipeline (each imports its framework when run)."""
