"""Encoder vs decoder time of an ONNX artifact: its encoder-only sub-model, timed next to the whole model.

The encoder-only model (compress.graph_split: image -> classification outputs + the pooled features the
decoder reads) is cut out of the artifact's own file, so it has the artifact's precision (fp32, fp16,
int8) and runs in an ONNX Runtime session set up like deploy.runtime's (all graph optimisations, the
same intra-op threads and providers). decoder ms = whole model - encoder-only, per round.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress.graph_split import split_text_decoder
from deploy.runtime import default_providers, session_options


class EncoderOnly:
    """`run(batch)` of the encoder-only part of an ONNX model that has a text output."""

    def __init__(self, open_session: Callable[[], ort.InferenceSession], workdir: tempfile.TemporaryDirectory):
        self._open, self._workdir = open_session, workdir
        self.session = open_session()
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: batch})

    def reopen(self) -> None:
        """A new session of the same sub-model, as the bench gives its whole model each round."""
        self.session = None  # released before the next is built
        self.session = self._open()

    def close(self) -> None:
        self._workdir.cleanup()


def open_encoder_only(path: Path, threads: int | None, providers: list[str] | None) -> EncoderOnly | None:
    """The encoder-only model of `path` in a session, or None when the model has no text output."""
    workdir = tempfile.TemporaryDirectory(prefix="encoder-only-")
    split = split_text_decoder(path, workdir.name)
    if split is None:
        workdir.cleanup()
        return None
    options = session_options(threads or None)  # the deployed model's own session options
    chosen = providers or default_providers(ort.get_available_providers())  # as deploy.runtime chooses
    return EncoderOnly(functools.partial(ort.InferenceSession, str(split[0]), options, providers=list(chosen)),
                       workdir)


def encoder_decoder_ms(full_rounds_ms: list[float], encoder_rounds_ms: list[float]) -> dict:
    """{"encoder_ms", "decoder_ms", "full_over_encoder"}: medians over rounds of the encoder-only time,
    of (whole - encoder-only) per round, and of whole / encoder-only per round with its spread."""
    from benchmarks.interleave import ratio_over_rounds

    pairs = list(zip(full_rounds_ms, encoder_rounds_ms))
    return {"encoder_ms": float(np.median([e for _, e in pairs])),
            "decoder_ms": float(np.median([f - e for f, e in pairs])),
            "full_over_encoder": ratio_over_rounds([f for f, _ in pairs], [e for _, e in pairs])}
