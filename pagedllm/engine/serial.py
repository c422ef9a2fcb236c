"""msgpack (msgspec) encoding of the messages between the front end and the engine core: typed,
compact, and decoded straight into the core_types Structs."""

import msgspec

from pagedllm.core_types import CoreInput, EngineCoreOutputs

_encoder = msgspec.msgpack.Encoder()
_input_decoder = msgspec.msgpack.Decoder(CoreInput)
_output_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)


def encode(message) -> bytes:
    return _encoder.encode(message)


def decode_input(data) -> CoreInput:
    return _input_decoder.decode(data)


def decode_outputs(data) -> EngineCoreOutputs:
    return _output_decoder.decode(data)
