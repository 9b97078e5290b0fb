"""A whole payload: the header and every layer's frame, decoded and checked as a set.

`wire.py` reads one piece at a time (header, frame); this module assembles them, in layer order,
and checks what only the whole payload shows: every layer arrived, full-attention layers keep one
token set, sliding-window layers keep exactly its part inside their window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import WireFormatError
from .kv import LayerKV, first_slot
from .wire import Fingerprint, Header, frame_end, read_frame, read_header


@dataclass
class Payload:
    """A decoded payload: its header and one LayerKV per layer, in layer order."""

    header: Header
    layers: list[LayerKV]


class PayloadDecoder:
    """Incremental decoder for a streamed payload: the header, then frames in layer order.

    Each piece is verified on arrival, so a receiver rejects a bad frame before the rest comes.
    `finish()` checks that every layer arrived and that the kept token sets are consistent.
    """

    def __init__(self, expect: Fingerprint | None = None) -> None:
        self.expect = expect
        self.header: Header | None = None
        self.layers: list[LayerKV] = []
        self._full_keep: torch.Tensor | None = None

    def feed_header(self, buf: bytes | memoryview) -> Header:
        if self.header is not None:
            raise WireFormatError("a second header in one payload")
        header, used = read_header(buf, self.expect)
        if used != len(buf):
            raise WireFormatError(f"{len(buf) - used} unexpected bytes after the header")
        self.header = header
        return header

    def feed_frame(self, buf: bytes | memoryview) -> LayerKV:
        if self.header is None:
            raise WireFormatError("a frame before the header")
        layer = len(self.layers)
        if layer >= self.header.fingerprint.n_layers:
            raise WireFormatError("more frames than layers")
        kv, _, used = read_frame(buf, 0, self.header, layer)
        if used != len(buf):
            raise WireFormatError(f"{len(buf) - used} unexpected bytes after frame {layer}")
        if not self.header.fingerprint.is_sliding(layer):
            if self._full_keep is None:
                self._full_keep = kv.positions
            elif not torch.equal(self._full_keep, kv.positions):
                raise WireFormatError(f"layer {layer} keeps a different token set than layer 0")
        self.layers.append(kv)
        return kv

    @property
    def complete(self) -> bool:
        return self.header is not None and len(self.layers) == self.header.fingerprint.n_layers

    def finish(self) -> Payload:
        if self.header is None or not self.complete:
            got = len(self.layers)
            raise WireFormatError(f"payload incomplete: {got} layer frames received")
        _check_sliding_consistency(self.header, self.layers, self._full_keep)
        return Payload(self.header, self.layers)


def decode_payload(buf: bytes | memoryview, expect: Fingerprint | None = None) -> Payload:
    """Decode a whole payload. Raises WireFormatError / ChecksumError / IncompatiblePayloadError."""
    dec = PayloadDecoder(expect)
    header, off = read_header(buf, expect)
    dec.header = header
    mv = memoryview(buf)
    for layer in range(header.fingerprint.n_layers):
        end = frame_end(mv, off, layer)
        dec.feed_frame(mv[off:end])
        off = end
    if off != len(buf):
        raise WireFormatError(f"{len(buf) - off} unexpected bytes after the last frame")
    return dec.finish()


def _check_sliding_consistency(
    header: Header, layers: list[LayerKV], full_keep: torch.Tensor | None
) -> None:
    """Sliding layers must keep exactly the full layers' tokens that fall inside their window."""
    if full_keep is None:
        return
    for layer in header.fingerprint.sliding_layers:
        first = first_slot(True, header.fingerprint.sliding_window, header.n_tokens)
        want = full_keep[full_keep >= first]
        if not torch.equal(layers[layer].positions, want):
            raise WireFormatError(
                f"sliding layer {layer} keeps a token set inconsistent with the rest"
            )
