"""Exposition: turns what the collectors read into the families of a Snapshot.

`SeriesEmitter` renders one GPU's series to lines while its collectors run; `FamilyBuilder`
merges those, the exporter's own series and, with `naming: dcgm`, the `dcgm` translation into
one family per metric.
"""

from exporter.exposition.families import FamilyBuilder, family_header
from exporter.exposition.series import PlanCache, SeriesCache, SeriesEmitter

__all__ = ["FamilyBuilder", "PlanCache", "SeriesCache", "SeriesEmitter", "family_header"]
