"""losswire's wire layer, owned by neither side: what a client and a server must agree on to talk.

- :mod:`~losswire.wire.protocol`: service and method names, metadata keys, pushback, size limits;
- :mod:`~losswire.wire.codec`: tensors, forward inputs and loss configs to protobuf and back;
- :mod:`~losswire.wire.chunks`: big tensors in chunks after their message (``EvaluateStream``);
- :mod:`~losswire.wire.shared_memory`: the segment layout of same-host shared memory;
- :mod:`~losswire.wire.buffers`: big byte buffers reused call after call;
- :mod:`~losswire.wire.staging`: pinned host buffers for copies to and from a CUDA device.

It imports the contract's messages (``losswire.v1``), torch, numpy and protobuf; never gRPC, the
client or the server.
"""
