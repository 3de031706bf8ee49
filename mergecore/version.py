"""The package version, in a module of its own so that low layers (the output-folder marker)
can read it without importing the `mergecore` package, which reaches up to `merge`."""

__version__ = "0.1.0"
