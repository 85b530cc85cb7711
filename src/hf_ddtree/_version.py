"""The package version, in a module of its own so that code inside the package can read it without importing
the package (calibrate.py keys its disk cache by it)."""

__version__ = "0.1.0"  # keep in step with setup.cfg
