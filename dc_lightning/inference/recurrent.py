"""``CompressedLSTM`` / ``CompressedGRU`` / ``CompressedRNN``: every layer and direction of ``nn.LSTM`` / ``nn.GRU`` /
``nn.RNN`` from compressed matrices, with torch's calling convention (padded or ``PackedSequence`` input, ``h0`` /
``(h0, c0)``, ``batch_first``, unbatched input, ``proj_size``, bidirectional, multi-layer, inter-layer dropout)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.inference.matrix import linear_numel, projection
from dc_lightning.kernels import layouts
from dc_lightning.kernels.runtime import use_triton

# ------------------------------------------------------------------------------------------------ recurrent layers

States = tuple[Tensor, ...]  # (h,) for GRU/RNN, (h, c) for LSTM; each [L*D, B, size]


# On the CPU a call of at most this many timesteps steps through products straight from the compressed matrices
# (the layout's reference: a sparse layer multiplies from its entries) instead of decoding every matrix. Measured on
# the 2-core dev box, 1 thread, 2x600 GRU / LSTM at density 0.1, batch 1 (bench/RESULTS.md "CPU path vs dense"):
# stepping / decoding 2.4 / 6.4 ms (GRU) and 2.8 / 9.8 ms (LSTM) at 1 timestep, 6.4 / 8.7 and 7.4 / 12.1 at 4. A
# product costs ~0.4x a decode at density 0.1 and ~0.6x at 0.5, where 3 products per matrix pair (T = 2) still win.
STEP_MAX = 2

Product = Callable[[nn.Module, Tensor], Tensor]  # (projection, x [..., in]) -> [..., out]


def decoded_weight(m: nn.Module, dtype: torch.dtype) -> Tensor:
    """The dense ``[out, in]`` weight of a projection (decoded for a :class:`CompressedLinear`), in ``dtype``."""
    w = m.dense_weight() if isinstance(m, CompressedLinear) else m.weight
    return w.to(dtype)


def call_projection(m: nn.Module, x: Tensor) -> Tensor:
    """``m(x)``: a :class:`CompressedLinear` through its registered op (the compressed kernels on CUDA)."""
    return m(x)


def cpu_projection(m: nn.Module, x: Tensor) -> Tensor:
    """``m(x)`` on the CPU without the op's dispatch: a :class:`CompressedLinear` by its layout's reference (small
    batches of a sparse layer straight from its entries), anything else by its own forward."""
    if not isinstance(m, CompressedLinear):
        return m(x)
    x2 = x.reshape(-1, m.in_features)
    name = m.layout_for(x2.shape[0])
    y = layouts.spec(name).reference(x2, m.packed(name), m.bias, m.relu)
    return y.reshape(*x.shape[:-1], m.out_features)


class CompressedRNNBase(nn.Module):
    """What :class:`CompressedLSTM` / :class:`CompressedGRU` / :class:`CompressedRNN` share.

    ``cells[layer * num_directions + direction]`` is a ``ModuleDict`` with ``ih``, ``hh`` (and ``hr``): a
    :class:`~dc_lightning.inference.linear.CompressedLinear` for a compressed matrix, a dense ``nn.Linear`` otherwise;
    the biases ``b_ih`` / ``b_hh`` live in ``ih`` / ``hh``.

    ``forward`` takes what torch's module takes and returns what it returns: a padded tensor (``batch_first`` both
    ways) or a 2-D unbatched one, or a ``PackedSequence`` (output packed with the same ``batch_sizes`` /
    ``sorted_indices`` / ``unsorted_indices``, final states per sequence in the caller's order, as torch gives them).
    Two paths, chosen by where the compressed kernels run (``dc_lightning.kernels.runtime.use_triton``):

    * **kernels** (CUDA, or the CPU under ``TRITON_INTERPRET=1``): multiplies straight from the compressed matrices.
      EIE's NT-LSTM layer multiplies one [4H x (I+H)] matrix by ``[x_t; h_{t-1}]`` per step ([EIE] Table III); here
      ``W_ih`` and ``W_hh`` stay two matrices: the input half runs ONCE per layer and direction over all timesteps
      (``W_ih @ [x_1 .. x_T]``, ``T * B`` columns: far better weight reuse), only ``W_hh @ h_{t-1}`` (+ ``W_hr``)
      per step. A packed batch shrinks from step to step: step ``t`` updates the first ``batch_sizes[t]`` rows.
    * **dense** (everything else, the CPU): each weight matrix is decoded ONCE per call and the whole sequence runs in
      torch's own kernel (``torch._VF.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu``, as ``nn.LSTM.forward`` calls
      it). The decoded weights are dropped at the end of the call: the module keeps only its compressed form.
      Except for calls of at most :data:`STEP_MAX` timesteps (a sampler's one call per token): decoding every matrix
      for one step costs more than multiplying from the compressed form, so those take the kernel path's step loop
      with each product on the layout's CPU reference (:func:`cpu_projection`; a sparse layer multiplies small
      batches straight from its entries).

    Inter-layer dropout applies in training mode only, as in torch.
    """

    _torch_name: str  #: the torch class it replaces
    _modes: tuple[str, ...]  #: torch's RNNBase.mode values of that class
    _n_states = 1

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

    @property
    def bias(self) -> bool:
        """Whether the layer has the biases ``b_ih`` / ``b_hh`` (``nn.RNNBase.bias``)."""
        return getattr(self.cells[0]["ih"], "bias", None) is not None

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
        # the registry (dc_lightning.kinds) routes each torch RNN here by type; a direct call checks torch's `mode`
        if getattr(rnn, "mode", None) not in cls._modes:
            raise TypeError(
                f"{cls.__name__}.from_module expects an nn.{cls._torch_name}, got {type(rnn).__name__}"
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

    # ------------------------------------------------------------------------------------------ what differs per kind
    def _state_sizes(self) -> tuple[int, ...]:
        return (self.hidden_size,)

    def _step(self, gi: Tensor, states: States, cell: nn.ModuleDict, mm: Product) -> States:
        """One timestep of the kernel path: ``gi`` = ``W_ih x_t + b_ih`` [b, G*H], ``states`` [b, size] each;
        ``mm(cell[name], v)`` is a product by one of the cell's matrices."""
        raise NotImplementedError

    def _vf(self) -> Callable:
        """torch's functional kernel for this kind (``torch._VF.lstm``...)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------------------- forward
    def _forward(self, input: Tensor | PackedSequence, hx: States | None) -> tuple[Tensor | PackedSequence, States]:
        """torch's conventions around :meth:`_run_kernels` / :meth:`_run_dense` (both work sequence-first)."""
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            x, batch_sizes, sorted_indices, unsorted_indices = input
            if x.dim() != 2:
                raise ValueError(f"{name}: a PackedSequence's data must be 2-D, got shape {tuple(x.shape)}")
            batch, is_batched = int(batch_sizes[0]), True
        else:
            x, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            if not isinstance(x, Tensor) or x.dim() not in (2, 3):
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} expects a 2-D or 3-D input or a PackedSequence, got {got}")
            is_batched = x.dim() == 3
            x = x.unsqueeze(1) if not is_batched else x.transpose(0, 1) if self.batch_first else x
            batch = x.shape[1]
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input's last dimension must be input_size={self.input_size}, got {x.shape[-1]}")
        want = [(self.num_layers * self.num_directions, batch, size) for size in self._state_sizes()]
        if hx is None:
            states = tuple(x.new_zeros(shape) for shape in want)
        else:
            for h, shape, label in zip(hx, want, ("h0", "c0")[: len(want)], strict=True):
                shape = shape if is_batched else (shape[0], shape[2])  # unbatched input: unbatched states, as torch
                if not isinstance(h, Tensor) or tuple(h.shape) != shape:
                    got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                    raise ValueError(f"{name}: {label} must have shape {shape}, got {got}")
            states = hx if is_batched else tuple(h.unsqueeze(1) for h in hx)
            if sorted_indices is not None:  # the caller's order -> the packed (sorted) order, as torch does
                states = tuple(h.index_select(1, sorted_indices) for h in states)
        steps = x.shape[0] if batch_sizes is None else batch_sizes.numel()
        if use_triton(x):
            out, states = self._run_kernels(x, None if batch_sizes is None else batch_sizes.tolist(), states)
        elif steps <= STEP_MAX:
            bs = None if batch_sizes is None else batch_sizes.tolist()
            out, states = self._run_kernels(x, bs, states, cpu_projection)
        else:
            out, states = self._run_dense(x, batch_sizes, states)
        if batch_sizes is not None:
            if unsorted_indices is not None:
                states = tuple(h.index_select(1, unsorted_indices) for h in states)
            return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), states
        if not is_batched:
            return out.squeeze(1), tuple(h.squeeze(1) for h in states)
        return (out.transpose(0, 1) if self.batch_first else out), states

    def _run_dense(self, x: Tensor, batch_sizes: Tensor | None, states: States) -> tuple[Tensor, States]:
        """Decode every matrix once, then torch's kernel. x: [T, B, I] or packed [N, I]."""
        weights = []
        for cell in self.cells:  # torch's flat order per layer and direction: w_ih, w_hh, b_ih, b_hh, w_hr
            weights += [decoded_weight(cell["ih"], x.dtype), decoded_weight(cell["hh"], x.dtype)]
            if self.bias:
                weights += [cell["ih"].bias.to(x.dtype), cell["hh"].bias.to(x.dtype)]
            if "hr" in cell:
                weights.append(decoded_weight(cell["hr"], x.dtype))
        hx = list(states) if len(states) > 1 else states[0]
        config = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if batch_sizes is None:
            result = self._vf()(x, hx, weights, *config, False)
        else:
            result = self._vf()(x, batch_sizes, hx, weights, *config)
        return result[0], tuple(result[1:])

    def _run_kernels(
        self, x: Tensor, batch_sizes: list[int] | None, states: States, mm: Product = call_projection
    ) -> tuple[Tensor, States]:
        """Step through the compressed products ``mm`` (the kernels through the ops by default). x: [T, B, I] or
        packed [N, I] (``batch_sizes`` non-increasing)."""
        D = self.num_directions
        finals: list[list[Tensor]] = [[] for _ in states]
        layer_input = x
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0.0:
                layer_input = F.dropout(layer_input, p=self.dropout)
            outs = []
            for d in range(D):
                cell = self.cells[layer * D + d]
                gi = mm(cell["ih"], layer_input)  # every timestep in one product: [T, B, G*H] / [N, G*H]
                steps = gi.unbind(0) if batch_sizes is None else gi.split(batch_sizes)
                s = tuple(h[layer * D + d] for h in states)
                ys: list[Tensor] = [s[0]] * len(steps)
                for t in range(len(steps) - 1, -1, -1) if d == 1 else range(len(steps)):
                    b = steps[t].shape[0]
                    if b == s[0].shape[0]:
                        s = self._step(steps[t], s, cell, mm)
                        ys[t] = s[0]
                    else:  # a packed batch: the first b sequences are still running; the others keep their states
                        new = self._step(steps[t], tuple(h[:b] for h in s), cell, mm)
                        ys[t] = new[0]
                        s = tuple(torch.cat([n, h[b:]]) for n, h in zip(new, s, strict=True))
                outs.append(torch.stack(ys) if batch_sizes is None else torch.cat(ys))
                for acc, h in zip(finals, s, strict=True):
                    acc.append(h)
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        return layer_input, tuple(torch.stack(acc) for acc in finals)

    # ----------------------------------------------------------------------------------------------------------------
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


Input = Tensor | PackedSequence


class CompressedLSTM(CompressedRNNBase):
    """``nn.LSTM`` from compressed matrices (gate order i, f, g, o; ``proj_size`` supported). See
    :class:`CompressedRNNBase`. ``forward(input, (h0, c0)=None) -> output, (h_n, c_n)``."""

    _torch_name, _modes = "LSTM", ("LSTM",)

    def _state_sizes(self) -> tuple[int, ...]:
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _vf(self) -> Callable:
        return _VF.lstm

    def _step(self, gi: Tensor, states: States, cell: nn.ModuleDict, mm: Product) -> States:
        h, c = states
        i, f, g, o = (gi + mm(cell["hh"], h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if "hr" in cell:
            h = mm(cell["hr"], h)
        return h, c

    def forward(self, input: Input, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Input, tuple[Tensor, Tensor]]:
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"{type(self).__name__}: hx must be a tuple (h0, c0), got {type(hx).__name__}")
        out, (h_n, c_n) = self._forward(input, None if hx is None else tuple(hx))
        return out, (h_n, c_n)


class _CompressedSingleState(CompressedRNNBase):
    def forward(self, input: Input, hx: Tensor | None = None) -> tuple[Input, Tensor]:
        if hx is not None and not isinstance(hx, Tensor):
            raise TypeError(f"{type(self).__name__}: hx must be a tensor h0, got {type(hx).__name__}")
        out, (h_n,) = self._forward(input, None if hx is None else (hx,))
        return out, h_n


class CompressedGRU(_CompressedSingleState):
    """``nn.GRU`` from compressed matrices (gate order r, z, n; ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``).
    See :class:`CompressedRNNBase`. ``forward(input, h0=None) -> output, h_n``."""

    _torch_name, _modes = "GRU", ("GRU",)

    def _vf(self) -> Callable:
        return _VF.gru

    def _step(self, gi: Tensor, states: States, cell: nn.ModuleDict, mm: Product) -> States:
        (h,) = states
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = mm(cell["hh"], h).chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return ((1.0 - z) * n + z * h,)


class CompressedRNN(_CompressedSingleState):
    """``nn.RNN`` (``nonlinearity`` tanh or relu) from compressed matrices. See :class:`CompressedRNNBase`.
    ``forward(input, h0=None) -> output, h_n``."""

    _torch_name, _modes = "RNN", ("RNN_TANH", "RNN_RELU")

    def __init__(self, cells: Iterable[nn.ModuleDict], *, nonlinearity: str = "tanh", **kwargs) -> None:
        super().__init__(cells, **kwargs)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity

    @staticmethod
    def _config(rnn: nn.RNNBase) -> dict:
        return {**CompressedRNNBase._config(rnn), "nonlinearity": rnn.nonlinearity}

    def _vf(self) -> Callable:
        return _VF.rnn_tanh if self.nonlinearity == "tanh" else _VF.rnn_relu

    def _step(self, gi: Tensor, states: States, cell: nn.ModuleDict, mm: Product) -> States:
        pre = gi + mm(cell["hh"], states[0])
        return (torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre),)
