"""``check_written``: every check of a checkpoint a backend wrote, in the order that explains most (P21).

The order follows what depends on what: the root document first (without a
readable manifest nothing else can be placed), then the manifest against the
case, the claim, the group and array documents, the tree of files, the chunk
bytes, and last the three readers. An entry already found wrong is not read
again by the later steps, so that one fault gives one finding, not four.
Nothing here raises on a damaged checkpoint: every problem is a finding.
"""

from __future__ import annotations

from pathlib import Path

from tessera.format import key_to_path, parent_paths

from ..cases.model import Finding
from .chunks import check_chunks
from .documents import check_array_document, check_claim, check_group_documents
from .entries import check_entries
from .expected import ExpectedCheckpoint
from .files import check_files
from .findings import Findings
from .manifest import check_root
from .readers import check_reference_reader, check_stock_readers

__all__ = ["check_written"]


def check_written(root: Path, expected: ExpectedCheckpoint) -> list[Finding]:
    """Every rule the checkpoint at ``root`` breaks, given what the case asked to write there."""
    out = Findings()
    root = Path(root)
    if not root.is_dir():
        out.add("R2.1", f"there is no checkpoint directory at {root}")
        return out.result()
    manifest = check_root(root, expected, out)
    if manifest is None:
        return out.result()
    check_claim(root, manifest, out)
    stored = check_entries(manifest, expected, out)
    groups = {group for path in stored.array_paths for group in parent_paths(path)}
    skip = set(stored.broken)
    skip.update(key_to_path(e.key) for e in expected.entries if key_to_path(e.key) not in stored.paths)
    check_group_documents(root, groups, out)
    layouts = {a.path: a.layout for a in stored.arrays}
    for path in stored.array_paths:
        if not check_array_document(root, path, layouts.get(path), out):
            skip.add(path)
    skip |= check_files(root, stored, groups, expected.world_size, out)
    for array in stored.arrays:
        if not check_chunks(root, array, out):
            skip.add(array.path)
    check_reference_reader(root, expected, skip, out)
    check_stock_readers(root, stored.arrays, skip, out)
    return out.result()
