"""A large decode step as two halves on two CUDA streams (NanoFlow's nano-batches).

A decode step's GEMMs at 65-256 rows are latency-bound (Qwen3-0.6B on the H200: ~0.9 ms a step
against ~0.3 ms to read the weights) while its attention is bandwidth-bound. The two halves of the
batch never read each other's rows, so one half's GEMMs can run on the SMs the other half's
attention leaves idle. The price: each weight is read twice a step, and twice the launches (one
graph replay either way). Inside a CUDA graph the fork and the join are captured as events.

Not with tensor parallelism: both halves would all-reduce on one communicator from two streams.
"""

import contextlib

import torch

from pagedllm.layers.attention import AttentionMetadata

MIN_ROWS = 128   # decode steps of fewer rows run as one batch


def applies(input_ids: torch.Tensor, md: AttentionMetadata, tp_size: int) -> bool:
    """A decode-only step (no cascade plan) of MIN_ROWS or more on a GPU, one rank."""
    return (input_ids.is_cuda and tp_size == 1 and md.decode_only and md.shared is None
            and input_ids.shape[0] >= MIN_ROWS)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The second half's stream on a GPU, made once (by the eager run before a capture); none on CPU,
    where the halves run one after the other (tests run the split there)."""
    if device.type != "cuda":
        return None
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def run_halves(layers, norm, hidden: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
    """The decoder layers and the final norm over hidden's two halves, layer by layer in turn (so that
    an eager step launches both halves' kernels early too); returns the normed rows in order. hidden,
    the embedded tokens, stays referenced until the join: the second half reads a view of it."""
    half = hidden.shape[0] // 2
    parts = [(positions[:half], md.decode_rows(0, half)), (positions[half:], md.decode_rows(half, hidden.shape[0]))]
    states = [[hidden[:half], None], [hidden[half:], None]]
    side = _side_stream(hidden.device)
    contexts = [contextlib.nullcontext, contextlib.nullcontext if side is None else lambda: torch.cuda.stream(side)]
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(hidden.device))
    for layer in layers:
        for (pos, half_md), state, context in zip(parts, states, contexts):
            with context():
                state[0], state[1] = layer(pos, state[0], state[1], half_md)
    outs = []
    for state, context in zip(states, contexts):
        with context():
            outs.append(norm(state[0], state[1])[0])
    if side is not None:
        torch.cuda.current_stream(hidden.device).wait_stream(side)
    return torch.cat(outs)
