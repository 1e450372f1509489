"""Triton's ModelConfig message for this server's model: what gRPC's ModelConfig rpc returns and what the
REST binding's `/config` route returns as JSON (Triton's own JSON form of the same message)."""

from __future__ import annotations

from serve.api.pb.inference import grpc_service_pb2 as pb
from serve.service.inference import HIDDEN, IDS, LOGITS, PLATFORM, STATE_IN, STATE_OUT, TritonConfig


def model_config(config: TritonConfig) -> pb.ModelConfig:
    """Triton's ModelConfig message for the configuration export's config.pbtxt holds."""
    state = [config.num_layers, config.state_size]
    fp32 = pb.DataType.TYPE_FP32
    batching = pb.ModelSequenceBatching(
        max_sequence_idle_microseconds=config.max_sequence_idle_microseconds,
        oldest=pb.ModelSequenceBatching.StrategyOldest(
            max_candidate_sequences=config.max_candidate_sequences,
            max_queue_delay_microseconds=config.max_queue_delay_microseconds),
        state=[pb.ModelSequenceBatching.State(
            input_name=STATE_IN, output_name=STATE_OUT, data_type=fp32, dims=state,
            initial_state=[pb.ModelSequenceBatching.InitialState(name="zero", data_type=fp32, dims=state,
                                                                 zero_data=True)])])
    return pb.ModelConfig(
        name=config.name, platform=PLATFORM, max_batch_size=config.max_batch_size,
        input=[pb.ModelInput(name=IDS, data_type=pb.DataType.TYPE_INT64, dims=[-1])],
        output=[pb.ModelOutput(name=LOGITS, data_type=fp32, dims=[-1, config.vocab_size]),
                pb.ModelOutput(name=STATE_OUT, data_type=fp32, dims=state),
                *([pb.ModelOutput(name=HIDDEN, data_type=fp32, dims=[-1, config.num_layers, config.hidden_size])]
                  if config.hidden_size else [])],
        sequence_batching=batching)
