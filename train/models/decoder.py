"""The GRU diagnosis decoder: pooled image features -> a sentence of token ids (task T3).

As in Chelaramani et al.: token embedding -> one GRU layer whose initial state is
tanh(Linear(features)) -> Linear to the vocabulary. With `context=True` (our default) a projection of
the pooled features is also concatenated to every step's input: with only the initial state to go on,
a decoder trained for a few epochs learns the language first and tends to emit the commonest sentence
whatever the image; feeding the image at every step makes location, size and counts learnable. The
per-step cost is one precomputed `W_c f` added to the input gates. Two implementations of the same
cell share the nn.GRU weights:

* the fused `nn.GRU` (fast) for teacher-forced training and validation losses;
* an explicit step (Gemm/Split/Add/Sigmoid/Tanh/Mul, argmax as ArgMax) unrolled in Python over
  `max_len`, for greedy generation and scheduled sampling. Exported to ONNX it contains only plain ops
  (no GRU/Loop/If), which TensorRT and INT8 quantizers handle everywhere.

Greedy decoding is written so that each unrolled step costs what its arithmetic costs (the deployed
student runs it `max_len` times per image, and per-node dispatch, not arithmetic, dominated it):
the token's input gates are one Gather from a `[vocab, 3*hidden]` table (embedding x W_ih + b_ih,
folded into a constant by the exporter), and one Gemm per step yields both the logits of this step
and the hidden gates of the next (`[W_hh; W_out]` stacked). The tests hold the
per-step node budget and the token-for-token parity with ONNX Runtime (tests/test_compress.py).

There is no early exit at <eos>: every row runs `max_len` steps, so the graph is static and exportable;
consumers cut the ids at the first <eos> (deploy.vocab.Vocabulary.decode). `max_len` is the dataset
vocabulary's (its longest training sentence plus <eos>, deploy.vocab.Vocabulary.build).
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from deploy.vocab import BOS_ID, PAD_ID
from train.models.registry import register


@register("gru", kind="decoder")
class DiagnosisDecoder(nn.Module):
    """Greedy/teacher-forced GRU sentence decoder conditioned on a pooled feature vector."""

    def __init__(self, feat_dim: int, vocab_size: int, max_len: int, embed_dim: int = 256,
                 hidden: int = 512, teacher_forcing: float = 1.0, context: bool = False) -> None:
        super().__init__()
        if vocab_size < 5:
            raise ValueError(f"vocab_size {vocab_size} is too small: 4 special tokens plus at least one word")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (one word and <eos>), got {max_len}")
        self.vocab_size, self.max_len, self.hidden = vocab_size, max_len, hidden
        self.teacher_forcing = teacher_forcing
        self.embed_dim, self.context = embed_dim, context
        self.init_state = nn.Linear(feat_dim, hidden)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.context_proj = nn.Linear(feat_dim, embed_dim) if context else None
        self.gru = nn.GRU(embed_dim * (2 if context else 1), hidden, num_layers=1, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def initial_state(self, features: Tensor) -> Tensor:
        """h0 = tanh(W f + b): `[N, hidden]`."""
        return torch.tanh(self.init_state(features))

    def start(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        """(h0, context gates `W_c proj(f)` `[N, 3*hidden]` or None): what every step needs."""
        if self.context_proj is None:
            return self.initial_state(features), None
        ctx = self.context_proj(features)
        return self.initial_state(features), nnf.linear(ctx, self.gru.weight_ih_l0[:, self.embed_dim:])

    # --- explicit cell (export-friendly) -------------------------------------------------------
    def _token_gates(self, embedded: Tensor, ctx_gates: Tensor | None) -> Tensor:
        gates = nnf.linear(embedded, self.gru.weight_ih_l0[:, : self.embed_dim], self.gru.bias_ih_l0)
        return gates if ctx_gates is None else gates + ctx_gates

    def input_gates(self, tokens: Tensor, ctx_gates: Tensor | None = None) -> Tensor:
        """W_ih x + b_ih for token ids `[N]` -> `[N, 3*hidden]` (embedding lookup exports as Gather)."""
        return self._token_gates(self.embed(tokens), ctx_gates)

    def bos_gates(self, ctx_gates: Tensor | None = None) -> Tensor:
        """Input gates of <bos>: a `[1, 3*hidden]` constant row (plus the context gates) that broadcasts
        over the batch, so no batch-sized <bos> tensor is built from the input shape (no Shape op)."""
        return self._token_gates(self.embed.weight[BOS_ID:BOS_ID + 1], ctx_gates)

    def cell(self, gates_x: Tensor, h: Tensor) -> Tensor:
        """One GRU step from precomputed input gates, with PyTorch's gate order (r, z, n)."""
        gates_h = nnf.linear(h, self.gru.weight_hh_l0, self.gru.bias_hh_l0)
        return self._gru_update(gates_x, *gates_h.split([2 * self.hidden, self.hidden], dim=1), h)

    def _gru_update(self, gates_x: Tensor, h_rz: Tensor, h_n: Tensor, h: Tensor) -> Tensor:
        """h' from the input gates W_ih x + b_ih `[N, 3*hidden]` and the hidden gates W_hh h + b_hh,
        split into their (r, z) and n parts.

        One Split per operand, one Sigmoid for r and z together, and h' = n + z (h - n) (= (1 - z) n + z h):
        every op here is a node in each exported step.
        """
        H = self.hidden
        x_rz, x_n = gates_x.split([2 * H, H], dim=1)
        r, z = torch.sigmoid(x_rz + h_rz).split([H, H], dim=1)
        n = torch.tanh(x_n + r * h_n)
        return n + z * (h - n)

    def token_gate_table(self) -> Tensor:
        """Input gates of every token, `[vocab, 3*hidden]` = embedding x W_ih^T + b_ih (context excluded).

        ExportModel computes it once and exports it as a constant, so each exported step looks its
        token's gates up with one Gather instead of Gather + Gemm.
        """
        w_tok = self.gru.weight_ih_l0[:, : self.embed_dim]
        return torch.matmul(self.embed.weight, w_tok.t()) + self.gru.bias_ih_l0

    def greedy(self, features: Tensor, table: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Greedy decoding for exactly `max_len` steps: (logits `[N, L, V]`, token ids `[N, L]` int64).

        Same recurrence as `cell`/`input_gates`, arranged for the exported graph: input gates looked up
        in `table` (`token_gate_table()`, computed here unless given) and one Gemm per step for
        [this step's logits | the next step's hidden gates].
        """
        h, ctx = self.start(features)
        table = self.token_gate_table() if table is None else table
        H, V = self.hidden, self.vocab_size
        both_w = torch.cat([self.out.weight, self.gru.weight_hh_l0])  # [V + 3H, hidden]
        both_b = torch.cat([self.out.bias, self.gru.bias_hh_l0])
        gates_x = table[BOS_ID:BOS_ID + 1]
        gates_x = gates_x if ctx is None else gates_x + ctx
        h_rz, h_n = nnf.linear(h, self.gru.weight_hh_l0, self.gru.bias_hh_l0).split([2 * H, H], dim=1)
        all_logits, all_tokens = [], []
        for step in range(self.max_len):
            h = self._gru_update(gates_x, h_rz, h_n, h)
            if step + 1 == self.max_len:  # the last step needs no next-step gates
                logits = self.out(h)
            else:
                logits, h_rz, h_n = nnf.linear(h, both_w, both_b).split([V, 2 * H, H], dim=1)
            tokens = logits.argmax(dim=-1)
            all_logits.append(logits)
            all_tokens.append(tokens)
            gates_x = table[tokens] if ctx is None else table[tokens] + ctx
        return torch.stack(all_logits, dim=1), _stack_columns(all_tokens)

    def stepwise(self, features: Tensor, targets: Tensor, teacher_forcing: float = 1.0) -> Tensor:
        """Explicit-cell decoding fed with `targets` `[N, L]` with probability `teacher_forcing` per row
        and step, else with the model's own previous argmax (scheduled sampling). Returns `[N, L, V]`."""
        h, ctx = self.start(features)
        gates_x = self.bos_gates(ctx)
        steps = []
        for t in range(targets.shape[1]):
            h = self.cell(gates_x, h)
            logits = self.out(h)
            steps.append(logits)
            if t + 1 == targets.shape[1]:
                break
            prev = targets[:, t]
            if teacher_forcing < 1.0:
                use_truth = torch.rand(prev.shape, device=prev.device) < teacher_forcing
                prev = torch.where(use_truth, prev, logits.detach().argmax(dim=-1))
            gates_x = self.input_gates(prev, ctx)
        return torch.stack(steps, dim=1)

    # --- fused path (training speed) -----------------------------------------------------------
    def teacher_forced(self, features: Tensor, targets: Tensor) -> Tensor:
        """Fused nn.GRU over inputs <bos> + targets[:, :-1]: logits `[N, L, V]` for targets `[N, L]`."""
        bos = targets.new_full((targets.shape[0], 1), BOS_ID)
        inputs = torch.cat([bos, targets[:, :-1]], dim=1)
        h0 = self.initial_state(features).unsqueeze(0)
        x = self.embed(inputs)
        if self.context_proj is not None:
            x = torch.cat([x, self.context_proj(features).unsqueeze(1).expand(-1, x.shape[1], -1)], dim=-1)
        out, _ = self.gru(x, h0)
        return self.out(out)

    def forward(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        """Token logits `[N, L, V]`: teacher-forced when `targets` is given (scheduled sampling in training
        when teacher_forcing < 1), greedy otherwise."""
        if targets is None:
            return self.greedy(features)[0]
        if targets.dim() != 2:
            raise ValueError(f"text targets must be [N, max_len] token ids, got shape {tuple(targets.shape)}")
        if self.training and self.teacher_forcing < 1.0:
            return self.stepwise(features, targets, self.teacher_forcing)
        return self.teacher_forced(features, targets)


def _stack_columns(columns: list[Tensor]) -> Tensor:
    """`[N]` tensors -> `[N, L]`. Concat + Reshape + Transpose exports as 3 nodes; torch.stack as one
    Unsqueeze per column plus a Concat."""
    return torch.cat(columns).reshape(len(columns), -1).t()
