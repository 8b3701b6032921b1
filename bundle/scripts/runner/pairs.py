"""The pairs a `run inference` registers, from its command-line options: one pair, a cover table or the sample."""

from __future__ import annotations

from ..io.anhir import PairRow, read_cover_table, single_pair_table
from ..usage import UsageError

__all__ = ["select_pairs"]


def select_pairs(
    pairs_csv: str | None,
    source: str | None,
    target: str | None,
    source_landmarks: str | None,
    target_landmarks: str | None,
    sample_pairs_csv: str,
    source_annotations: str | None = None,
    target_annotations: str | None = None,
) -> tuple[list[str], list[PairRow]]:
    """The pairs a run registers: ``--source/--target`` if given, else ``--pairs_csv``, else the embedded sample."""
    if source or target:
        if not (source and target):
            missing = "--target" if source else "--source"
            raise UsageError(missing, "missing: --source and --target go together, give both images of the pair")
        if pairs_csv:
            raise UsageError("--pairs_csv", "give either --pairs_csv or --source/--target, not both")
        annotations = (source_annotations, target_annotations)
        return single_pair_table(source, target, source_landmarks, target_landmarks, *annotations)
    if source_landmarks or target_landmarks:
        given = "--source_landmarks" if source_landmarks else "--target_landmarks"
        raise UsageError(given, "landmark options need --source/--target; a cover table names its own landmarks")
    if source_annotations or target_annotations:
        given = "--source_annotations" if source_annotations else "--target_annotations"
        raise UsageError(given, "annotation options need --source/--target; a cover table names its own annotations")
    return read_cover_table(pairs_csv or sample_pairs_csv)
