"""ferry: virtual machines as portable as containers."""

__version__ = "0.1.0"
