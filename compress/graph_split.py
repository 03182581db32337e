"""The text decoder's part of an exported graph: which nodes it is, where it starts, and the encoder-only
and decoder-only sub-models cut out of any flavour (fp32, fp16, int8) of a model.

The unrolled greedy decoder is traced from functional calls, so its nodes carry no module scope; it is
found by data flow instead: the nodes that contribute to a text output and to no classification output.
Its inputs from the rest of the graph (the pooled image features) are the *boundary*. The benchmark
times the encoder-only model (image -> classification outputs + boundary) next to the whole model to
report encoder vs decoder milliseconds; the decoder export tests run the decoder-only model (boundary
-> tokens) on the PyTorch features of every flavour to check greedy parity token for token.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from onnx.utils import Extractor


def ancestors(graph: onnx.GraphProto, outputs: list[str]) -> set[int]:
    """Indices of the nodes of `graph` that contribute to any of `outputs`."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in seen:
            seen.add(i)
            stack.extend(graph.node[i].input)
    return seen


def _is_text(output: onnx.ValueInfoProto) -> bool:
    """Text outputs are token ids (int64); classification outputs are probabilities (float)."""
    return output.type.tensor_type.elem_type == onnx.TensorProto.INT64


def text_only_nodes(graph: onnx.GraphProto, text_outputs: list[str] | None = None) -> set[int]:
    """Indices of the nodes that feed the text outputs (default: the int64 outputs) and nothing else."""
    text = text_outputs if text_outputs is not None else [o.name for o in graph.output if _is_text(o)]
    others = [o.name for o in graph.output if o.name not in text]
    return ancestors(graph, text) - ancestors(graph, others)


def boundary(graph: onnx.GraphProto, text_nodes: set[int]) -> list[str]:
    """Tensors the decoder reads from the rest of the graph (not initializers), in first-use order."""
    made_inside = {o for i in text_nodes for o in graph.node[i].output}
    constants = {t.name for t in graph.initializer}
    found: list[str] = []
    for i in sorted(text_nodes):
        for name in graph.node[i].input:
            if name and name not in made_inside and name not in constants and name not in found:
                found.append(name)
    return found


def decoder_op_counts(model: onnx.ModelProto) -> Counter:
    """Op type -> count over the text-only nodes (the unrolled decoder)."""
    graph = model.graph
    return Counter(graph.node[i].op_type for i in text_only_nodes(graph))


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str], out_path: Path) -> Path:
    # The Extractor needs the type of every cut tensor (onnx >= 1.18 no longer infers them itself).
    sub = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(inputs, outputs)
    sub.opset_import.extend(o for o in model.opset_import if o not in sub.opset_import)
    onnx.save(sub, str(out_path))
    return out_path


def split_text_decoder(path: str | Path, out_dir: str | Path) -> tuple[Path, Path, list[str]] | None:
    """(encoder-only model, decoder-only model, boundary tensor names) written to `out_dir`, or None
    when the model has no text output. The encoder-only model keeps every classification output."""
    model = onnx.load(str(path))
    graph = model.graph
    text = [o.name for o in graph.output if _is_text(o)]
    if not text:
        return None
    cut = boundary(graph, text_only_nodes(graph, text))
    inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    others = [o.name for o in graph.output if o.name not in text]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(path).name.removesuffix(".onnx")
    encoder = _extract(model, inputs, [*others, *cut], out_dir / f"{stem}.encoder-only.onnx")
    decoder = _extract(model, cut, text, out_dir / f"{stem}.decoder-only.onnx")
    return encoder, decoder, cut
