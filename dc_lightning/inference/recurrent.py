"""``CompressedLSTM`` / ``CompressedGRU`` / ``CompressedRNN``: every layer and direction of ``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN`` from compressed matrices (input products once over all timesteps, recurrent products per step)."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

# ------------------------------------------------------------------------------------------------ recurrent layers
from dc_lightning.inference.matrix import linear_numel, projection


class CompressedRNNBase(nn.Module):
    """Shared loop of :class:`CompressedLSTM` / :class:`CompressedGRU` / :class:`CompressedRNN`.

    Layout of the gate products (EIE's NT-LSTM layer multiplies one [4H x (I+H)] matrix by ``[x_t; h_{t-1}]`` per
    step, [EIE] Table III): here ``W_ih`` and ``W_hh`` stay two compressed matrices. The input half does not depend
    on the recurrence, so it runs ONCE per layer and direction over all timesteps (``W_ih @ [x_1 .. x_T]``: a
    batch of ``T * B`` columns, far better weight reuse than T products of ``B`` columns); only ``W_hh @ h_{t-1}``
    (+ ``W_hr`` for an LSTM with ``proj_size``) runs per step. Biases ``b_ih`` / ``b_hh`` are fused into those two
    products (the GRU needs ``W_hn h + b_hn`` separately from the input half, which this split gives for free).

    ``cells[layer * num_directions + direction]`` is a ``ModuleDict`` with ``ih``, ``hh`` (and ``hr``): a
    :class:`~dc_lightning.inference.linear.CompressedLinear` for a compressed matrix, a dense ``nn.Linear`` otherwise.
    Inter-layer dropout applies in training mode only. ``PackedSequence`` input is rejected (pad it and pass the
    padded tensor; outputs past a sequence's length are then not meaningful).
    """

    _gates: int
    _torch_type: type[nn.RNNBase]

    def __init__(
        self,
        cells: Iterable[nn.ModuleDict],
        *,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bidirectional: bool,
        batch_first: bool,
        dropout: float = 0.0,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bidirectional = bool(bidirectional)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.proj_size = int(proj_size)
        if len(self.cells) != self.num_layers * self.num_directions:
            raise ValueError(f"expected {self.num_layers * self.num_directions} cells, got {len(self.cells)}")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @classmethod
    def from_module(cls, rnn: nn.RNNBase, keep_dense: Collection[str] = ()) -> CompressedRNNBase:
        """Build from the matching ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``.

        Args:
            rnn: the recurrent layer.
            keep_dense: weights to keep as dense ``nn.Linear`` although compressed (``"weight_hh_l0"``...).

        Raises:
            TypeError: ``rnn`` is not of the matching type.
            ValueError: a compressed matrix cannot be packed (:func:`param_codes`).
        """
        if not isinstance(rnn, cls._torch_type):
            raise TypeError(
                f"{cls.__name__}.from_module expects an nn.{cls._torch_type.__name__}, got {type(rnn).__name__}"
            )
        cells = []
        for layer in range(rnn.num_layers):
            for sfx in ("", "_reverse")[: 2 if rnn.bidirectional else 1]:
                s = f"l{layer}{sfx}"
                b_ih, b_hh = (getattr(rnn, f"bias_{k}_{s}").detach() if rnn.bias else None for k in ("ih", "hh"))
                cell = {
                    "ih": projection(rnn, f"weight_ih_{s}", b_ih, dense=f"weight_ih_{s}" in keep_dense),
                    "hh": projection(rnn, f"weight_hh_{s}", b_hh, dense=f"weight_hh_{s}" in keep_dense),
                }
                if getattr(rnn, "proj_size", 0):
                    cell["hr"] = projection(rnn, f"weight_hr_{s}", dense=f"weight_hr_{s}" in keep_dense)
                cells.append(nn.ModuleDict(cell))
        return cls(cells, **cls._config(rnn))

    @staticmethod
    def _config(rnn: nn.RNNBase) -> dict:
        return {
            "input_size": rnn.input_size,
            "hidden_size": rnn.hidden_size,
            "num_layers": rnn.num_layers,
            "bidirectional": rnn.bidirectional,
            "batch_first": rnn.batch_first,
            "dropout": rnn.dropout,
            "proj_size": getattr(rnn, "proj_size", 0),
        }

    def flatten_parameters(self) -> None:
        """No-op (cuDNN's flat weight buffer does not exist here); kept so that user code calling it still runs."""

    def _step(self, gi: Tensor, h: Tensor, c: Tensor | None, cell: nn.ModuleDict) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _run(self, x: Tensor, h0: Tensor, c0: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """x: [T, B, I]; h0: [L*D, B, H_out]; c0: [L*D, B, H] or None. Returns output [T, B, D*H_out], h_n, c_n."""
        T = x.shape[0]
        D = self.num_directions
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0.0:
                layer_input = F.dropout(layer_input, p=self.dropout)
            outs = []
            for d in range(D):
                cell = self.cells[layer * D + d]
                gi = cell["ih"](layer_input)  # [T, B, G*H]: the input half for every timestep in one product
                h = h0[layer * D + d]
                c = None if c0 is None else c0[layer * D + d]
                ys: list[Tensor] = [h] * T
                for t in range(T - 1, -1, -1) if d == 1 else range(T):
                    h, c = self._step(gi[t], h, c, cell)
                    ys[t] = h
                outs.append(torch.stack(ys))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=2)
        return layer_input, torch.stack(h_n), (torch.stack(c_n) if c_n else None)

    def _prepare(self, input: Tensor) -> tuple[Tensor, bool]:
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"{type(self).__name__} does not take a PackedSequence; pass the padded tensor "
                "(torch.nn.utils.rnn.pad_packed_sequence) instead"
            )
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__} expects a 2-D or 3-D input, got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input's last dimension must be input_size={self.input_size}, got {input.shape[-1]}")
        is_batched = input.dim() == 3
        if not is_batched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        return input, is_batched

    def _zeros(self, x: Tensor, size: int) -> Tensor:
        return x.new_zeros(self.num_layers * self.num_directions, x.shape[1], size)

    def _check_state(self, h: Tensor, x: Tensor, size: int, name: str) -> Tensor:
        want = (self.num_layers * self.num_directions, x.shape[1], size)
        if tuple(h.shape) != want:
            raise ValueError(f"{type(self).__name__}: {name} must have shape {want}, got {tuple(h.shape)}")
        return h

    def _finish(self, out: Tensor, is_batched: bool) -> Tensor:
        if not is_batched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out

    def dense_numel(self) -> int:
        return sum(linear_numel(m) for cell in self.cells for m in cell.values())

    def get_extra_state(self) -> dict:
        return self._config(self)

    def set_extra_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def extra_repr(self) -> str:
        s = (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, batch_first={self.batch_first}"
        )
        return s + (f", proj_size={self.proj_size}" if self.proj_size else "")


class CompressedLSTM(CompressedRNNBase):
    """``nn.LSTM`` on the compressed kernel (gate order i, f, g, o; ``proj_size`` supported). See
    :class:`CompressedRNNBase` for the layout. ``forward(input, (h0, c0)=None) -> output, (h_n, c_n)``."""

    _gates = 4
    _torch_type = nn.LSTM

    def _step(self, gi: Tensor, h: Tensor, c: Tensor | None, cell: nn.ModuleDict) -> tuple[Tensor, Tensor]:
        i, f, g, o = (gi + cell["hh"](h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if "hr" in cell:
            h = cell["hr"](h)
        return h, c

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, is_batched = self._prepare(input)
        if hx is None:
            h0, c0 = self._zeros(x, self.proj_size or self.hidden_size), self._zeros(x, self.hidden_size)
        else:
            h0, c0 = hx if is_batched else (t.unsqueeze(1) for t in hx)
            h0 = self._check_state(h0, x, self.proj_size or self.hidden_size, "h0")
            c0 = self._check_state(c0, x, self.hidden_size, "c0")
        out, h_n, c_n = self._run(x, h0, c0)
        if not is_batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._finish(out, is_batched), (h_n, c_n)


class _CompressedSingleState(CompressedRNNBase):
    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, is_batched = self._prepare(input)
        if hx is None:
            h0 = self._zeros(x, self.hidden_size)
        else:
            h0 = self._check_state(hx if is_batched else hx.unsqueeze(1), x, self.hidden_size, "h0")
        out, h_n, _ = self._run(x, h0, None)
        return self._finish(out, is_batched), (h_n if is_batched else h_n.squeeze(1))


class CompressedGRU(_CompressedSingleState):
    """``nn.GRU`` on the compressed kernel (gate order r, z, n; ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``).
    ``forward(input, h0=None) -> output, h_n``."""

    _gates = 3
    _torch_type = nn.GRU

    def _step(self, gi: Tensor, h: Tensor, c: None, cell: nn.ModuleDict) -> tuple[Tensor, None]:
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = cell["hh"](h).chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1.0 - z) * n + z * h, None


class CompressedRNN(_CompressedSingleState):
    """``nn.RNN`` (``nonlinearity`` tanh or relu) on the compressed kernel.
    ``forward(input, h0=None) -> output, h_n``."""

    _gates = 1
    _torch_type = nn.RNN

    def __init__(self, cells: Iterable[nn.ModuleDict], *, nonlinearity: str = "tanh", **kwargs) -> None:
        super().__init__(cells, **kwargs)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity

    @staticmethod
    def _config(rnn: nn.RNNBase) -> dict:
        return {**CompressedRNNBase._config(rnn), "nonlinearity": rnn.nonlinearity}

    def _step(self, gi: Tensor, h: Tensor, c: None, cell: nn.ModuleDict) -> tuple[Tensor, None]:
        pre = gi + cell["hh"](h)
        return (torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)), None
