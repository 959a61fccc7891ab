"""The server's gRPC front doors: the only code of the server, with its assembly, that speaks gRPC.

``loss_service`` (``losswire.v1.LossService``) and ``inference`` (the Open Inference Protocol, converted
by ``oip_convert``) turn each call into the dataplane's and back; ``calls`` runs the dataplane off the
event loop and answers failures through ``status``, the one mapping of typed errors to status codes;
the interceptors read unary requests only with room for them (``intake``), count calls (``metrics``),
refuse unparsable requests (``malformed``) and callers without a token (``authentication``), and bound
request streams (``streams``); ``health`` bounds the health service's Watch streams; ``tls`` holds the
server's certificates.
"""
