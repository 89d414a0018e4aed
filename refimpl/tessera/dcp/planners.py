"""DCP planners that never pickle.

DCP's default planners turn every non-tensor value into ``torch.save`` bytes on
save (``transform_object``) and ``torch.load`` them with ``weights_only=False``
on load (``load_bytes``). With Tessera neither is needed: the writer takes each
value as it is (``lookup_object``) and stores it as a JSON entry, and the reader
hands the stored JSON value to :meth:`TesseraLoadPlanner.load_value`. These
subclasses close the pickling paths, so that no other storage plug-in combined
with them pickles either; they are otherwise DCP's defaults.
"""

from __future__ import annotations

import io
from typing import Any

from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, WriteItem, WriteItemType

from ..errors import UnsafeEncodingError

__all__ = ["TesseraLoadPlanner", "TesseraSavePlanner"]


class TesseraSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, but a non-tensor value is never turned into pickle bytes."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002 (DCP's name)
        if write_item.type != WriteItemType.BYTE_IO:
            return object
        raise UnsafeEncodingError(
            f"{write_item.index.fqn}: TesseraSavePlanner does not pickle non-tensor values; "
            "save with tessera.dcp.TesseraStorageWriter, which stores them as JSON"
        )


class TesseraLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner that takes non-tensor values as they are, never unpickling."""

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        """Put a stored (JSON or bytes) value at the read item's key of the state dict."""
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], value)
        else:
            self.state_dict[fqn] = value

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeEncodingError(
            f"{read_item.dest_index.fqn}: TesseraLoadPlanner does not unpickle; "
            "load with tessera.dcp.TesseraStorageReader, which hands it the stored JSON value"
        )
