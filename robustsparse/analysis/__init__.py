"""Measurements of networks: ``ntk`` (the empirical NTK and its distance) and ``dynamics`` (NTK and outputs
recorded on a probe set during training)."""
