"""The one place km's version is defined; both halves report it."""

__version__ = "0.1.0"
