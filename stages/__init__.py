"""Built-in stages, one module each. Importing this package registers them with the engine.

Data path: ingest -> keywords -> ground -> segment -> perturb -> score -> bucket -> write.
"""

from stages import bucket, ground, ingest, keywords, perturb, score, segment, write

__all__ = ["bucket", "ground", "ingest", "keywords", "perturb", "score", "segment", "write"]
