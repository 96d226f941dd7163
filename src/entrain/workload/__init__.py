"""Workloads: the manifest format, its columnar form, and synthetic trace generators."""

from entrain.workload.columnar import MODALITIES, MODALITY_FIELDS, ItemTable, Workload
from entrain.workload.manifest import (
    ManifestError,
    ManifestReader,
    iter_batches,
    read_manifest,
    write_manifest,
)

__all__ = [
    "MODALITIES",
    "MODALITY_FIELDS",
    "ItemTable",
    "ManifestError",
    "ManifestReader",
    "Workload",
    "iter_batches",
    "read_manifest",
    "write_manifest",
]
