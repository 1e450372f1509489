"""The KServe v2 servicer (inference.GRPCInferenceService): converts protobuf messages to calls of the
transport-free InferenceService (serve/service/inference.py) and back, nothing more.

Auth, admission, errors, metrics and the log line are the interceptors' (serve/api/grpc/interceptors.py), as
for CharRNN. ModelStreamInfer is the exception that proves it: one request's error there is that
response's error_message (the status mapping's message) and the stream goes on, as Triton does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from serve.api.admission import Gate
from serve.api.grpc.interceptors import Context  # grpc.aio.ServicerContext, for any rpc
from serve.api.grpc.tensors import inputs_of, response_of, sequence_of
from serve.api.pb.inference import grpc_service_pb2 as pb
from serve.api.pb.inference import grpc_service_pb2_grpc as pb_grpc
from serve.api.status import status_of
from serve.api.triton_config import model_config
from serve.service.inference import (
    InferenceService,
    InferRequest,
)
from serve.service.models import ModelSlot

log = logging.getLogger(__name__)

SERVER_NAME = "charrnn"
# The protocol's extensions this server implements: Triton's names (its ServerMetadata lists them so).
EXTENSIONS = ("model_configuration", "sequence", "sequence(string_id)")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: ModelSlot, version: str, gate: Gate) -> None:
        """models: a call runs on the model current as it starts (serve/service/models.py); version: the
        project's (ServerMetadata); gate: while it drains, the probes say not ready."""
        self.models = models
        self.version = version
        self._gate = gate

    @property
    def service(self) -> InferenceService:
        """The current model's, for the calls that only describe it."""
        return self.models.current.inference

    def _ready(self) -> bool:
        return self._gate.ready(self.service.ready)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: Context) -> pb.ModelReadyResponse:
        self.service.check_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: Context) -> pb.ModelMetadataResponse:
        meta = self.service.metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                    for t in meta.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                     for t in meta.outputs])

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config(self.service.config(request.name, request.version)))

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        with self.models.use() as model:
            service = model.inference
            service.check_model(request.model_name, request.model_version)  # before the tensors' errors
            outputs = await service.infer(InferRequest(
                request.model_name, request.model_version, inputs_of(request),
                tuple(dict.fromkeys(o.name for o in request.outputs)), sequence_of(request.parameters)))
        return response_of(request, service.model_name, service.version, outputs)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: Context) -> pb.ModelInferResponse:
        return await self._infer(request)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a failed request's is its error_message."""
        async for request in request_iterator:
            try:
                response = await self._infer(request)
            except Exception as error:  # the stream goes on, as Triton's does
                code, message = status_of(error)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("ModelStreamInfer request failed", exc_info=error)
                yield pb.ModelStreamInferResponse(error_message=message,
                                                  infer_response=pb.ModelInferResponse(id=request.id))
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)
