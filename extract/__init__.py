"""Phase 1 of framegate: decode videos once and cache per-frame backbone features in HDF5."""

__version__ = "0.1.0"

from . import demo  # noqa: E402,F401  (registers the demo dataset)
