"""``inference.GRPCInferenceService``, the Open Inference Protocol (KServe v2 / Triton), on gRPC.

ModelInfer converts the request to losswire's contract (``oip_convert``), hands it to the same
dataplane as every other call (the same limits, budgets and safeguards), and converts the answer
back. The other methods describe the server and its models (one per registered loss).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from losswire.inference import grpc_predict_v2_pb2 as oip
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc

from .. import __version__
from ..dataplane import Dataplane
from . import oip_convert
from .calls import CallWatch, fail, release_after, unary
from .compute import Compute
from .oip_convert import GRAD, LOSS, MODEL_VERSION, Conversion, OipWhere

log = logging.getLogger("losswire.server")

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
SERVER_NAME, PLATFORM = "losswire", "losswire"


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over ``dataplane``; ``ready`` answers ServerReady (false while draining)."""

    def __init__(self, dataplane: Dataplane, compute: Compute, ready: Callable[[], bool] = lambda: True) -> None:
        self.dataplane = dataplane
        self.compute = compute
        self.ready = ready
        self.registry = dataplane.registry

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.ready())

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=request.name in self.registry and request.version in ("", MODEL_VERSION))

    @unary("ModelMetadata")
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        description = oip_convert.model(self.registry, request.name, request.version, "name", "version")
        outputs = [LOSS, *(GRAD + key for key in oip_convert.gradient_keys(description, declared=True))]
        return oip.ModelMetadataResponse(
            name=description.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=oip_convert.metadata_inputs(description),
            outputs=[oip.ModelMetadataResponse.TensorMetadata(name=n, datatype="FP32", shape=[-1]) for n in outputs],
        )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        watch = CallWatch(context, "ModelInfer")
        where = OipWhere(request.model_name)
        try:
            with watch.handling():
                description = oip_convert.model(
                    self.registry, request.model_name, request.model_version, "model_name", "model_version"
                )
                size = request.ByteSize()
                # it parses the config JSON and reads the contents: big ones off the event loop
                conversion = await self.compute.by_size(watch, size, Conversion, request, description, where)
                quick = conversion.typed_values <= oip_convert.QUICK_MAX_TYPED_VALUES  # converted on the loop
                answer = await self.compute.evaluate(
                    watch, self.dataplane.evaluate, size, conversion.request, watch, conversion.arrived, quick=quick
                )
                response = oip_convert.infer_response(request, conversion, answer.response)
        except Exception as error:
            fail(context, error, "ModelInfer", where)
            return None
        release_after(context, answer.keep)
        return response


def add_inference_service(server: grpc.aio.Server, service: InferenceService) -> str:
    """Serve the Open Inference Protocol on ``server``; returns the full service name, for reflection."""
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    return SERVICE_NAME
