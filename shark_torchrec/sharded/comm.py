"""The few collectives sharded compression and serving need, over ``torch.distributed`` (gloo
on CPU, nccl on CUDA); in a single process, or without ``torch.distributed``, they are local
and make no call.

Every rank must call the same collectives in the same order: the callers iterate over
layouts and schedules that are the same on every rank.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist


class Comm:
    """A process group's rank, size and collectives (default: the world group).

    Args:
        group: a ``torch.distributed`` process group, or None for the world (or a single
            process when ``torch.distributed`` is not initialised).
    """

    def __init__(self, group: Optional[Any] = None, local: bool = False) -> None:
        self.group = group
        self.distributed = not local and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        nccl = self.distributed and dist.get_backend(group) == "nccl"
        #: where tensors must be for the backend's collectives
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @staticmethod
    def local() -> "Comm":
        """This process alone, whether or not ``torch.distributed`` is initialised."""
        return Comm(local=True)

    def __getstate__(self):  # process groups do not pickle or deep-copy
        state = self.__dict__.copy()
        state["group"] = None
        return state

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks (a new tensor on ``t``'s device)."""
        if self.world == 1:
            return t.clone()
        moved = t.to(self.device).clone()
        dist.all_reduce(moved, group=self.group)
        return moved.to(t.device)

    def all_gather_object(self, obj: Any) -> List[Any]:
        if self.world == 1:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def exchange(self, sends: Sequence[torch.Tensor], recv_sizes: Optional[Sequence[int]] = None
                 ) -> List[torch.Tensor]:
        """All-to-all of 1-D tensors: ``sends[r]`` goes to rank ``r``; returns what each rank
        sent here.  ``recv_sizes`` (when the caller knows them) saves one collective."""
        if len(sends) != self.world:
            raise ValueError(f"exchange: {len(sends)} parts for {self.world} ranks")
        if self.world == 1:
            return [sends[0]]
        dtype = sends[0].dtype
        send_sizes = [int(s.numel()) for s in sends]
        if recv_sizes is None:
            sizes = torch.tensor(send_sizes, dtype=torch.long, device=self.device)
            got = torch.empty_like(sizes)
            dist.all_to_all_single(got, sizes, group=self.group)
            recv_sizes = got.tolist()
        inp = torch.cat([s.reshape(-1).to(self.device) for s in sends]) if sum(send_sizes) else \
            torch.empty(0, dtype=dtype, device=self.device)
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=self.device)
        dist.all_to_all_single(out, inp, list(recv_sizes), send_sizes, group=self.group)
        return list(torch.split(out, list(recv_sizes)))

    def exchange_flat(self, send: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int],
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All-to-all of one 1-D tensor already laid out rank by rank (``send_sizes[r]``
        elements for rank ``r``); returns what every rank sent here, rank by rank (into
        ``out`` when given: a 1-D tensor of ``sum(recv_sizes)`` elements on :attr:`device`)."""
        return self.exchange_flat_many([(send, send_sizes, recv_sizes, out)])[0]

    def exchange_flat_many(self, sends: Sequence[tuple]) -> List[torch.Tensor]:
        """Several :meth:`exchange_flat` (``(send, send_sizes, recv_sizes[, out])`` each) in
        flight at once (their latencies overlap)."""
        if self.world == 1:
            return [s[0] for s in sends]
        outs, works = [], []
        for send, send_sizes, recv_sizes, *given in sends:
            out = given[0] if given and given[0] is not None else \
                torch.empty(sum(recv_sizes), dtype=send.dtype, device=self.device)
            if out.numel() != sum(recv_sizes) or out.dtype != send.dtype:
                raise ValueError(f"exchange: out holds {out.numel()} {out.dtype}, the exchange brings "
                                 f"{sum(recv_sizes)} {send.dtype}")
            works.append(dist.all_to_all_single(out, send.reshape(-1).to(self.device), list(recv_sizes),
                                                list(send_sizes), group=self.group, async_op=True))
            outs.append(out)
        for w in works:
            w.wait()
        return outs

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)
