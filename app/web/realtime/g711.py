"""ITU-T G.711: the telephone network's 8-bit log codecs, mu-law (audio/pcmu) and A-law (audio/pcma), between
16-bit linear PCM and one byte a sample. Written from the recommendation's segment tables: each codec keeps a
sign, a 3-bit segment (an octave of loudness) and a 4-bit step inside it, and decodes to the middle of the step.

    mu-law: |x| + 132 (the bias) falls in segment e when it lies in [128 * 2^e, 256 * 2^e); its step is
            2^(e+3), so |x - decode(encode(x))| <= (|x| + 132) / 32 (the clip at 32635 included).
    A-law:  segments 0 and 1 share a step of 16, segment s >= 2 starts at 128 * 2^s with a step of 2^(s+3),
            so the error is at most max(8, |x| / 32), one more for negatives (A-law codes ~x for x < 0).

Every code is stored inverted (mu-law all bits, A-law every other bit, 0x55): silence is 0xFF and 0xD5.
"""

from __future__ import annotations

import numpy as np

_BIAS = 0x84  # mu-law adds it so that every segment starts at a power of two
_CLIP = 32635  # the largest magnitude that, biased, still fits in 15 bits
_OCTAVES = np.array([256, 512, 1024, 2048, 4096, 8192, 16384])  # where segments 1..7 begin (biased mu-law)


def ulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples, shape (n,) -> mu-law codes, uint8 (n,)."""
    x = np.asarray(pcm, np.int32)
    sign = np.where(x < 0, 0x80, 0)
    biased = np.minimum(np.abs(x), _CLIP) + _BIAS
    segment = np.searchsorted(_OCTAVES, biased, side="right")
    step = (biased >> (segment + 3)) & 0x0F
    return (~(sign | segment << 4 | step) & 0xFF).astype(np.uint8)


def ulaw_decode(codes: np.ndarray) -> np.ndarray:
    """mu-law codes, uint8 (n,) -> int16 samples (n,)."""
    u = ~np.asarray(codes, np.int32) & 0xFF
    segment, step = (u >> 4) & 0x07, u & 0x0F
    magnitude = (((step << 3) + _BIAS) << segment) - _BIAS
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples, shape (n,) -> A-law codes, uint8 (n,)."""
    x = np.asarray(pcm, np.int32) >> 3  # A-law codes 13 bits
    mask = np.where(x >= 0, 0xD5, 0x55)  # the sign bit, set for positives, and the even-bit inversion
    magnitude = np.where(x >= 0, x, ~x)  # 0..4095
    segment = np.searchsorted(_OCTAVES >> 3, magnitude, side="right")  # from 32, 64, ... 2048 on
    step = np.where(segment < 2, magnitude >> 1, magnitude >> np.maximum(segment, 1)) & 0x0F
    return ((segment << 4 | step) ^ mask).astype(np.uint8)


def alaw_decode(codes: np.ndarray) -> np.ndarray:
    """A-law codes, uint8 (n,) -> int16 samples (n,)."""
    a = np.asarray(codes, np.int32) ^ 0x55
    segment, step = (a >> 4) & 0x07, a & 0x0F
    magnitude = np.where(segment == 0, (step << 4) + 8, ((step << 4) + 0x108) << np.maximum(segment - 1, 0))
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)
