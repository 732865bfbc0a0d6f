"""Float64 golden of SinkWindow with a per-head profile (``profile={"sink" | "window": (layers, heads)}``),
written from the definition: query head h at absolute position p sees key j iff j <= p and
(j < sink_h or p - j < window_h), each head with its own (sink, window) as a uniform SinkWindow would."""
from __future__ import annotations

import goldens as G


def per_head_sink_window(params, off):
    """keep(b, h, i, j): head h follows ``params[h] = (sink, window)``; queries at i + off."""
    rules = [G.sink_window(sink, window) for sink, window in params]
    return lambda b, h, i, j: j <= i + off and rules[h](i + off, j)


def attention(params):
    """golden(q, k, v, site) of the per-head A-shape at the site's cache offset."""
    return lambda q, k, v, s: G.attention(q, k, v, per_head_sink_window(params, s.q_offset))
