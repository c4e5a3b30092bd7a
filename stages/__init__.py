"""Built-in stages, one module each. Importing this package registers them with the engine."""

from stages import ingest, write

__all__ = ["ingest", "write"]
