"""The package version, in a module of its own so that every module can read it without importing the package root."""

__version__ = "0.2.0"
