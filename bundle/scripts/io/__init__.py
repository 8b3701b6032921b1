"""Read: slides (JPG/PNG/TIFF pyramids, OME-TIFF, SVS, NDPI) and the ANHIR/BIRL formats (cover table, results columns,
landmark CSVs); slide writers."""

from .anhir import read_cover_table, read_landmarks, write_landmarks

__all__ = ["read_cover_table", "read_landmarks", "write_landmarks"]
