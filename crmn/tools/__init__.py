"""Developer tools that are not part of a run: timings and other measurements."""
