"""The package version, in one place that imports nothing: the adapter files record it, and
setuptools reads it from here for the distribution's metadata."""

__version__ = "0.1.0"
