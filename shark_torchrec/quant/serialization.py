"""Saving and loading a mixed collection: its ``state_dict`` (quantized rows in FBGEMM's layout,
the id maps) plus its :class:`~shark_torchrec.quant.layout.MixedLayout` as the module's extra
state, read back with ``torch.load(weights_only=True)`` — no pickled objects besides TorchRec's
packed 4-/2-bit tensor types."""

from __future__ import annotations

from typing import Dict

import torch
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor

from shark_torchrec.quant.layout import MixedLayout


def read_state(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (written by ``torch.save(module.state_dict(), path)``)."""
    with torch.serialization.safe_globals([UInt4Tensor, UInt2Tensor]):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a loadable mixed-collection state ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return state


def layout_of(state: Dict[str, torch.Tensor]) -> MixedLayout:
    """The layout a mixed collection's state dict carries."""
    if "_extra_state" not in state:
        raise ValueError("not a RowwiseMixedEmbeddingBagCollection state (no layout)")
    return MixedLayout.from_dict(state["_extra_state"])


def check_extra_state(layout: MixedLayout, state: Dict) -> None:
    """A state can only be loaded into a collection laid out the same way."""
    if MixedLayout.from_dict(state) != layout:
        raise ValueError("the saved state is of a differently laid out mixed collection")
