"""Run: one registrar over a cover table, its outputs written by the configured writers (per-pair failures recorded,
atomic pair folders, one run per folder, torchrun shards; `run inference`, the elastix baseline), and `run apply`."""

from .apply import ApplyRegistration
from .batch import BatchRegistration
from .pairs import select_pairs

__all__ = ["ApplyRegistration", "BatchRegistration", "select_pairs"]
