"""losswire's server side: the loss engine (``losswire.server.losses``) and, on top of it, the gRPC service."""

__version__ = "0.1.0"
