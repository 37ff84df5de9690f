"""vtadl: VT-ADL vision-transformer anomaly detection, trained as a service."""

from __future__ import annotations

__version__ = "0.1.0"
