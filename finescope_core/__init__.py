"""finescope: a big general LLM -> a small domain-specialised one, from ~10 seeds and a corpus.

The package is the pure library (no orchestration); the Prefect flows live in `flows/`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("finescope")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
