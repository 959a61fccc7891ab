"""What both ends of the wire agree on beyond the .proto: names, limits and metadata keys, defined once.

The .proto (``protos/losswire/v1/loss_service.proto``) is the contract's messages and methods; these
are the conventions around them that a client and a server must share to talk: the method paths, the
metadata keys, the retry pushback that marks a refusal as final, the sizes of streamed chunks and the
largest message and tensor rank either side handles.
"""

from __future__ import annotations

from losswire.v1 import loss_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name  # "losswire.v1.LossService"
PACKAGE = pb.DESCRIPTOR.package  # "losswire.v1": the only messages that can hold tensors
EVALUATE_STREAM_METHOD = f"/{SERVICE_NAME}/EvaluateStream"
DEFAULT_PORT = 50051

# gRPC's ceiling on one message; holds a 1 GiB tensor plus its target
MAX_MESSAGE_BYTES = 2**31 - 1
# A loss config, or a JSON forward input (AssociativeEmbeddingLoss's match), at most, encoded: a real one is
# a few hundred bytes (LVIS's 1203 class weights: ~11 KB), and parsed into Python objects it takes about 50
# times its bytes, so a config as big as a message could take the server's memory
MAX_JSON_BYTES = 1 << 20
# The most dimensions any tensor may declare (the codec's ceiling; a server may set a lower limit)
MAX_DIMS = 16
# The server's default rank limit: detection tensors have at most 5 ([N, C, D, H, W])
DEFAULT_MAX_DIMS = 8

# -- metadata --------------------------------------------------------------------------------------

# The session names of a call's terms (comma-separated): a proxy may route a session's calls by it
SESSION_HEADER = "x-losswire-session"
# A bearer token: "authorization: Bearer <token>"
AUTHORIZATION_HEADER = "authorization"
# gRPC's retry design (A6): a server pushback that is negative tells a retrying client not to retry.
# A refusal no retry can cure (a request over a size limit) carries it; a busy server's does not.
PUSHBACK_HEADER = "grpc-retry-pushback-ms"
NO_RETRY = (PUSHBACK_HEADER, "-1")
# set by gRPC on a retried call: the number of attempts before it
PREVIOUS_ATTEMPTS_HEADER = "grpc-previous-rpc-attempts"

# -- big tensors -----------------------------------------------------------------------------------

# Tensors of at least this many bytes leave the first message of a stream and follow in chunks;
# smaller ones ride inline (a chunk per tiny tensor would cost more than it saves).
STREAM_MIN_TENSOR_BYTES = 64 << 10
# Bytes per TensorChunk. gRPC moves a stream of messages of a few MiB far faster than one huge
# message (it reassembles a big message in slices and copies it whole); 4 MiB measured best here.
STREAM_CHUNK_BYTES = 4 << 20
# An answer's tensors of at least this many bytes go into the caller's output_shm range; smaller ones
# cost less inline than a reference does
SHARED_MEMORY_MIN_OUTPUT_BYTES = 4096

# -- lanes: one call's chunks on several streams (EvaluateRequest.lanes) --------------------------------

# Lanes of one call besides its request's stream
MAX_STREAM_LANES = 8
# A call's name for its lanes (StreamLanes.call): random bytes, too many to guess
LANE_CALL_MIN_BYTES, LANE_CALL_MAX_BYTES = 16, 64
# StreamLanes.stripe_bytes: a multiple of STRIPE_UNIT_BYTES, at most MAX_STRIPE_BYTES
STRIPE_UNIT_BYTES = 64 << 10
MAX_STRIPE_BYTES = 64 << 20
