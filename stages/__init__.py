"""Built-in stages, one module each. Importing this package registers them with the engine.

Data path: ingest -> keywords -> ground -> segment -> perturb -> write.
"""

from stages import ground, ingest, keywords, perturb, segment, write

__all__ = ["ground", "ingest", "keywords", "perturb", "segment", "write"]
