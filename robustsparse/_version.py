"""The library version, in one place: read by ``__init__``, checkpoints, exports and pyproject (dynamic version)."""
__version__ = "0.1.0"
