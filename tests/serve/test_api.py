"""Every rpc through a real server and real channels."""

from __future__ import annotations

import math
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.ops.version import project_version

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def generate(server, **fields) -> list[pb.GenerateResponse]:
    return list(server.stub.Generate(pb.GenerateRequest(**fields), timeout=30))


def text_of(responses) -> str:
    return "".join(r.text for r in responses)


def predict(server, chunks, top_k=0) -> list[pb.PredictResponse]:
    return list(server.stub.Predict(iter([pb.PredictRequest(text=c, top_k=top_k) for c in chunks]), timeout=30))


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# ---- Generate ---------------------------------------------------------------------------------------

def test_generate_streams_one_character_per_message_with_finish_on_last(text_server):
    responses = generate(text_server, prompt="it was", max_chars=57, seed=3)
    assert len(responses) == 57
    assert all(len(r.text) == 1 for r in responses)
    assert [r.index for r in responses] == list(range(57))
    assert [r.finish_reason for r in responses[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * 56
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(r.logprob <= 0 and math.isfinite(r.logprob) for r in responses)


def test_single_character_generation(text_server):
    responses = generate(text_server, prompt="it", max_chars=1, temperature=0)
    assert len(responses) == 1 and responses[0].finish_reason == pb.FINISH_REASON_LENGTH


def test_greedy_is_deterministic_and_matches_predict(hihell_server):
    a = generate(hihell_server, prompt="hihell", max_chars=30, temperature=0)
    b = generate(hihell_server, prompt="hihell", max_chars=30, temperature=0, seed=99)
    assert text_of(a) == text_of(b)
    # greedy's first character is Predict's `next` after the prompt
    assert text_of(a)[0] == predict(hihell_server, ["hihell"])[-1].next == "o"


def test_seeded_generation_reproduces_and_seeds_differ(text_server):
    request = dict(prompt="it was the ", max_chars=200, seed=1234, temperature=1.0)
    first = text_of(generate(text_server, **request))
    assert text_of(generate(text_server, **request)) == first
    others = {text_of(generate(text_server, **{**request, "seed": s})) for s in range(5)}
    assert len(others | {first}) > 1


def test_logprob_is_the_models_probability(hihell_server):
    responses = generate(hihell_server, prompt="hihell", max_chars=1, temperature=0)
    assert responses[0].text == "o"
    assert math.exp(responses[0].logprob) == pytest.approx(predict(hihell_server, ["hihell"])[-1].probability,
                                                           rel=1e-5)


def test_top_k_1_is_greedy(text_server):
    greedy = text_of(generate(text_server, prompt="it was", max_chars=80, temperature=0))
    assert text_of(generate(text_server, prompt="it was", max_chars=80, top_k=1, seed=5)) == greedy
    assert text_of(generate(text_server, prompt="it was", max_chars=80, top_p=1e-6, seed=5)) == greedy


def test_empty_prompt_is_seeded_and_deterministic(text_server):
    a = text_of(generate(text_server, prompt="", max_chars=40, seed=7))
    assert text_of(generate(text_server, prompt="", max_chars=40, seed=7)) == a
    greedy = generate(text_server, prompt="", max_chars=5, temperature=0)
    assert len(greedy) == 5 and greedy[0].index == 0


def test_stop_string_is_included_and_ends_with_stop(hihell_server):
    responses = generate(hihell_server, prompt="hi", max_chars=100, temperature=0, stop=["llo"])
    text = text_of(responses)
    assert text.endswith("llo") and text.count("llo") == 1
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


def test_stop_on_last_character_reports_stop(hihell_server):
    full = text_of(generate(hihell_server, prompt="hi", max_chars=20, temperature=0))
    n = full.index("llo") + 3
    responses = generate(hihell_server, prompt="hi", max_chars=n, temperature=0, stop=["llo"])
    assert len(responses) == n and responses[-1].finish_reason == pb.FINISH_REASON_STOP


def test_stop_matches_generated_text_not_prompt(hihell_server):
    responses = generate(hihell_server, prompt="hihello", max_chars=3, temperature=0, stop=["hello"])
    assert len(responses) == 3 and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("stop", ["llo", "ello", "hihello"])
def test_prompt_never_completes_a_stop_string(hihell_server, stop):
    # greedy after "hihell" is "o": prompt tail + first character spell the stop string, which must not
    # count, as stop strings match the generated text only; the stream ends where the generated text has it
    full = text_of(generate(hihell_server, prompt="hihell", max_chars=30, temperature=0))
    assert full[0] == "o" and ("hihell" + full[0]).endswith(stop)
    responses = generate(hihell_server, prompt="hihell", max_chars=30, temperature=0, stop=[stop])
    end = full.find(stop) + len(stop) if stop in full else len(full)
    assert len(responses) > 1 and responses[0].finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert text_of(responses) == full[:end]
    assert responses[-1].finish_reason == (pb.FINISH_REASON_STOP if stop in full else pb.FINISH_REASON_LENGTH)


@pytest.mark.parametrize("fields, fragment", [
    (dict(prompt="hi", max_chars=0), "max_chars"),
    (dict(prompt="hi", max_chars=1001), "max_chars"),
    (dict(prompt="hi", max_chars=5, temperature=-0.5), "temperature"),
    (dict(prompt="hi", max_chars=5, temperature=float("nan")), "temperature"),
    (dict(prompt="hi", max_chars=5, temperature=float("inf")), "temperature"),
    (dict(prompt="hi", max_chars=5, top_p=0.0), "top_p"),
    (dict(prompt="hi", max_chars=5, top_p=1.5), "top_p"),
    (dict(prompt="hi", max_chars=5, top_p=-1.0), "top_p"),
    (dict(prompt="hi", max_chars=5, top_p=float("nan")), "top_p"),
    (dict(prompt="hix!", max_chars=5), "'x', '!'"),
    (dict(prompt="hi", max_chars=5, stop=["lo", "lq"]), "stop[1]"),
    (dict(prompt="hi", max_chars=5, stop=[""]), "stop[0]"),
])
def test_generate_rejects_bad_requests(hihell_server, fields, fragment):
    code, details = status_of(lambda: generate(hihell_server, **fields))
    assert code == INVALID and fragment in details


# ---- Predict ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [["hihell"], list("hihell"), ["hi", "hel", "l"]])
def test_predict_hihell_gives_ihello(hihell_server, chunks):
    responses = predict(hihell_server, chunks)
    assert [r.input for r in responses] == list("hihell")
    assert "".join(r.next for r in responses) == "ihello"
    assert all(0.5 < r.probability <= 1 for r in responses)


def test_predict_top_candidates(hihell_server):
    responses = predict(hihell_server, ["hihell"], top_k=3)
    for r in responses:
        assert len(r.top) == 3 and r.top[0].text == r.next
        assert r.top[0].probability == pytest.approx(r.probability)
        assert [c.probability for c in r.top] == sorted((c.probability for c in r.top), reverse=True)
    assert len(predict(hihell_server, ["h"], top_k=99)[0].top) == 5  # capped at the vocabulary
    assert predict(hihell_server, ["h"])[0].top == []


def test_predict_rejects_unknown_characters_and_empty_text(hihell_server):
    code, details = status_of(lambda: predict(hihell_server, ["hi", "hex"]))
    assert code == INVALID and "'x'" in details
    assert status_of(lambda: predict(hihell_server, [""]))[0] == INVALID


def test_predict_with_no_messages_returns_nothing(hihell_server):
    assert predict(hihell_server, []) == []


# ---- Step -------------------------------------------------------------------------------------------

def step(server, text, state=b"", top_k=0) -> pb.StepResponse:
    return server.stub.Step(pb.StepRequest(state=state, text=text, top_k=top_k), timeout=30)


def test_step_chain_equals_predict(hihell_server):
    state, nexts = b"", []
    for c in "hihell":
        r = step(hihell_server, c, state)
        nexts.append(r.next)
        state = r.state
    assert "".join(nexts) == "ihello"
    assert step(hihell_server, "hihell").next == "o"


def test_step_chain_equals_predict_on_a_multilayer_model(text_server):
    text = "it was the season of "
    expected = predict(text_server, [text], top_k=4)
    state = b""
    for i, chunk in enumerate(["it ", "w", "as the season", " of "]):
        r = step(text_server, chunk, state, top_k=4)
        state = r.state
    assert r.next == expected[-1].next
    assert r.probability == pytest.approx(expected[-1].probability, abs=1e-6)
    assert [c.text for c in r.top] == [c.text for c in expected[-1].top]


def test_step_state_is_deterministic(hihell_server):
    assert step(hihell_server, "hih").state == step(hihell_server, "hih").state


def test_step_rejects_bad_state(hihell_server):
    good = step(hihell_server, "hi").state
    flipped = bytearray(good)
    flipped[60] ^= 0x01
    bad_states = {
        "truncated": good[:-1],
        "header only": good[:48],
        "padded": good + b"\0",
        "bit flip": bytes(flipped),
        "random": bytes(range(256)) * 2,
        "text": b"hello",
    }
    for name, state in bad_states.items():
        code, details = status_of(lambda: step(hihell_server, "e", state))
        assert code == INVALID, name


def info_of(server) -> pb.ModelInfo:
    return server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)


def test_state_from_another_model_is_failed_precondition_naming_the_servers_model(hihell_server, text_server):
    """Not INVALID_ARGUMENT: the bytes are fine, the client must start its chain again (a rolling deploy)."""
    foreign = step(text_server, "it").state
    code, details = status_of(lambda: step(hihell_server, "e", foreign))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"this server runs another model (sha256 {info_of(hihell_server).model_sha256[:12]}...)" in details
    assert f"(sha256 {info_of(text_server).model_sha256[:12]}...)" in details
    assert status_of(lambda: step(hihell_server, "e", foreign[:-1]))[0] == INVALID  # a damaged one is broken


def test_a_flipped_byte_in_the_states_model_fingerprint_reads_as_another_model(hihell_server):
    """Documented in the proto: the fingerprint is all there is to tell another model from damage."""
    damaged = bytearray(step(hihell_server, "hi").state)
    damaged[20] ^= 0x01  # inside the SHA-256, bytes 8..39
    assert status_of(lambda: step(hihell_server, "e", bytes(damaged)))[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_step_rejects_unknown_characters_and_empty_text(hihell_server):
    code, details = status_of(lambda: step(hihell_server, "hé"))
    assert code == INVALID and "'é'" in details
    assert status_of(lambda: step(hihell_server, ""))[0] == INVALID


# ---- GetModelInfo, health, reflection ---------------------------------------------------------------

def test_model_info(hihell_server, hihell_model):
    import hashlib
    info = hihell_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert list(info.vocab) == ["h", "i", "e", "l", "o"]
    assert (info.cell, info.num_layers, info.hidden_size, info.state_size) == ("rnn", 1, 5, 5)
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.model_sha256 == hashlib.sha256(hihell_model.read_bytes()).hexdigest()
    assert info.corpus == "hihell" and info.producer == "charrnn" and info.max_chars == 1000
    assert info.project_version == project_version() and re.fullmatch(r"\d+\.\d+\.\d+", info.project_version)


def test_lstm_model_info_and_step(lstm_server):
    info = lstm_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.cell == "lstm" and info.state_size == 2 * info.hidden_size
    r = step(lstm_server, "it was")
    chained = step(lstm_server, " the", r.state)
    whole = predict(lstm_server, ["it was the"])[-1]
    assert chained.next == whole.next and chained.probability == pytest.approx(whole.probability, abs=1e-6)


def test_health_reports_serving(hihell_server):
    stub = health_pb2_grpc.HealthStub(hihell_server.channel)
    for service in ("", "charrnn.v1.CharRNN", "inference.GRPCInferenceService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(hihell_server):
    stub = reflection_pb2_grpc.ServerReflectionStub(hihell_server.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in response.list_services_response.service}
    assert {"charrnn.v1.CharRNN", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="charrnn.v1.CharRNN")
    response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    assert response.file_descriptor_response.file_descriptor_proto
