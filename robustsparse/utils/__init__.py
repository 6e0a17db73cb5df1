"""Helpers with no knowledge of the pipeline: progress bars, the CPU thread cap, device resolution."""
