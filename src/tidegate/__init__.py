"""tidegate: a Python gateway for half a million long-lived connections on one machine."""

__version__ = "0.1.0"
