"""gpu-session: chat privately with any open model on a rented GPU."""

__version__ = "0.1.0"
