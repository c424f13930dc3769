"""Piper's VITS network cut in two, so that a phrase's voice starts before all of it exists: the front
(phonemes -> latent frames) runs on the whole phrase, the HiFi-GAN decoder (latent frames -> samples, most
of the work) a chunk of frames at a time, each with enough frames either side that the chunks join exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

DECODER = "/dec/"  # piper's exports name the decoder's nodes after the PyTorch module, `dec`


class Parts(NamedTuple):
    front: bytes  # ONNX: the voice's inputs -> the latent frames
    decoder: bytes  # ONNX: the latent frames -> the voice's output
    latent: str  # the tensor between the two, [1, channels, frames]
    hop: int  # samples per latent frame
    context: int  # frames either side of a chunk that every output sample of it can depend on


def split(path: str | Path) -> Parts | None:
    """Cut the voice at its decoder's input; None if the network is not a single-speaker VITS whose
    decoder reads the latent frames alone (a multi-speaker decoder also reads the speaker)."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(path))
    graph = model.graph
    nodes = [node for node in graph.node if node.name.startswith(DECODER)]
    made = {name for node in nodes for name in node.output}
    weights = {w.name for w in graph.initializer}
    outside = {name for node in nodes for name in node.input if name and name not in made | weights}
    if len(outside) != 1 or len(graph.output) != 1:
        return None
    (latent,) = outside
    extractor = Extractor(model)
    front = extractor.extract_model([i.name for i in graph.input], [latent])
    decoder = extractor.extract_model([latent], [graph.output[0].name])
    hop, context = _reach(nodes)
    return Parts(front.SerializeToString(), decoder.SerializeToString(), latent, hop, context)


def _reach(nodes: list) -> tuple[int, int]:
    """(samples per frame, frames of context) from the decoder's convolutions. Each one's reach is
    added as if all ran in a row, which bounds it from above: HiFi-GAN's residual blocks run side by
    side. A transposed convolution multiplies the rate by its stride."""
    from onnx.helper import get_attribute_value

    rate, reach = 1, 0.0
    for node in nodes:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        attrs = {a.name: get_attribute_value(a) for a in node.attribute}
        kernel, dilation = attrs["kernel_shape"][0], attrs.get("dilations", [1])[0]
        stride = attrs.get("strides", [1])[0]
        if node.op_type == "ConvTranspose":
            reach += kernel / stride / rate
            rate *= stride
        else:
            reach += (kernel - 1) * dilation / 2 / rate
    return rate, math.ceil(reach)


def chunks(frames: int, first: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, end) frame ranges covering `frames`: the first `first` long, each next one twice the one
    before, up to `most`. Small first so that the voice starts soon, then larger so that the context
    decoded twice costs little."""
    start, size = 0, first
    while start < frames:
        end = min(frames, start + size)
        yield start, end
        start, size = end, min(most, 2 * size)


def decode(run, parts: Parts, latent: np.ndarray, first: int, most: int) -> Iterator[np.ndarray]:
    """The decoder's output for `latent` ([1, channels, frames]), a chunk at a time, as float32 samples.
    `run(feeds)` runs the decoder."""
    frames = latent.shape[2]
    for start, end in chunks(frames, first, most):
        lo, hi = max(0, start - parts.context), min(frames, end + parts.context)
        audio = run({parts.latent: latent[:, :, lo:hi]}).reshape(-1)
        yield audio[(start - lo) * parts.hop : (end - lo) * parts.hop]
