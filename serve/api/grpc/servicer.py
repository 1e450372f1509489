"""The gRPC servicer: converts protobuf messages to service calls and back, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator

from serve.api.grpc.interceptors import Context  # grpc.aio.ServicerContext, for any rpc
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.engine.protocol import Finish
from serve.engine.runtime import PROVENANCE
from serve.service.charrnn import Prediction
from serve.service.models import ModelSlot

_FINISH = {Finish.NONE: pb.FINISH_REASON_UNSPECIFIED, Finish.LENGTH: pb.FINISH_REASON_LENGTH,
           Finish.STOP: pb.FINISH_REASON_STOP}


def _candidates(prediction: Prediction) -> list[pb.Candidate]:
    return [pb.Candidate(text=t, probability=p) for t, p in prediction.top]


class CharRNNServicer(pb_grpc.CharRNNServicer):
    """Auth, admission, errors, metrics and the log line are the interceptors' (serve/api/grpc/interceptors.py).

    Each call runs on the model that is current as it starts, to its end (serve/service/models.py)."""

    def __init__(self, models: ModelSlot) -> None:
        self.models = models

    async def Generate(self, request: pb.GenerateRequest,
                       context: Context) -> AsyncIterator[pb.GenerateResponse]:
        with self.models.use() as model:
            service = model.charrnn
            stream = service.generate(
                request.prompt, request.max_chars,
                request.temperature if request.HasField("temperature") else None, request.top_k,
                request.top_p if request.HasField("top_p") else None,
                request.seed if request.HasField("seed") else None, request.stop)
            text, finish_reason, response, index = service.vocab, _FINISH, pb.GenerateResponse, 0
            try:
                while True:
                    item = stream.pop()  # per character: no coroutine unless the engine is behind
                    if item is None:
                        await stream.wait()
                        continue
                    token, logprob, finish = item
                    yield response(text=text[token], index=index, logprob=logprob,
                                   finish_reason=finish_reason[finish])
                    if finish:
                        return
                    index += 1
            finally:
                stream.close()

    async def Predict(self, request_iterator: AsyncIterator[pb.PredictRequest],
                      context: Context) -> AsyncIterator[pb.PredictResponse]:
        state = None
        with self.models.use() as model:  # the state is this model's: the whole stream stays on it
            async for request in request_iterator:
                if request.hidden:
                    trace = await model.charrnn.trace(request.text, request.top_k, state)
                    state = trace.state
                    flat = trace.hidden.reshape(len(trace.predictions), -1)
                    for p, h in zip(trace.predictions, flat, strict=True):
                        yield pb.PredictResponse(input=p.input, next=p.next, probability=p.probability,
                                                 top=_candidates(p), hidden=h)
                    continue
                predictions, state = await model.charrnn.predict(request.text, request.top_k, state)
                for p in predictions:
                    yield pb.PredictResponse(input=p.input, next=p.next, probability=p.probability,
                                             top=_candidates(p))

    async def Step(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        with self.models.use() as model:
            result = await model.charrnn.step(request.state, request.text, request.top_k)
        p = result.prediction
        return pb.StepResponse(state=result.state, next=p.next, probability=p.probability, top=_candidates(p))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: Context) -> pb.ModelInfo:
        model = self.models.current
        info = model.charrnn.info()
        spec = info.spec
        return pb.ModelInfo(vocab=spec.vocab, cell=spec.cell, num_layers=spec.num_layers,
                            hidden_size=spec.hidden_size, state_size=spec.state_size,
                            execution_provider=info.execution_provider, model_sha256=spec.sha256,
                            max_chars=info.max_chars, project_version=info.project_version,
                            model_version=model.version,
                            **{k: spec.provenance.get(k, "") for k in PROVENANCE})
