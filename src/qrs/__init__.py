"""qrs: explainable visual inspection with a Quality Risk Score."""

__version__ = "0.1.0"
