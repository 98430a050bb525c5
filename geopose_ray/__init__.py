"""geopose-ray: distributed experiment sweeps for geocentric pose models on Ray."""

from __future__ import annotations

__version__ = "0.1.0"
