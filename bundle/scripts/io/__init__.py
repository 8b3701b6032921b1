"""Read: slides (JPG/PNG/TIFF pyramids, OME-TIFF, SVS, NDPI), landmark CSVs and the ANHIR cover table; slide writers."""

from .cover_table import read_cover_table, select_pairs

__all__ = ["read_cover_table", "select_pairs"]
