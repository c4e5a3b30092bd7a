"""mfpo-pipeline engine: configuration, stage interface, resumable sharded execution (local or Ray).

The engine knows no models: stages (in the `stages` package) do the work, the engine reads and writes
their shards, tracks completion and runs them locally or on Ray.
"""

from pipeline.errors import ConfigError, PipelineError, RowError
from pipeline.stage import BatchResult, Rejection, Resources, Stage, StageConfig, StageContext

__all__ = [
    "BatchResult",
    "ConfigError",
    "PipelineError",
    "Rejection",
    "Resources",
    "RowError",
    "Stage",
    "StageConfig",
    "StageContext",
]
__version__ = "0.1.0"
