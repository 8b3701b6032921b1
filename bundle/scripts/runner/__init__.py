"""Run: `run inference` over a cover table (per-pair failures recorded, atomic pair folders, one run per folder, torchrun shards) and `run apply`."""

from .apply import ApplyRegistration
from .batch import BatchRegistration
from .pairs import select_pairs

__all__ = ["ApplyRegistration", "BatchRegistration", "select_pairs"]
