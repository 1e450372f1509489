"""A Triton client for a character model, written from Triton's client documentation alone.

    pip install tritonclient[grpc]
    python clients/triton/example.py --url localhost:50051 --vocab '["e", "h", "i", "l", "o"]' --text hihell

It works the same against charrnn's server (inference.GRPCInferenceService) and against Triton serving
the repository `python -m export --triton-repo` writes: it uses only tritonclient.grpc and the model's
published tensors (input_ids INT64 [batch, seq], state_in FP32 [batch, layers, size] -> logits,
state_out). It
  1. reads the model's metadata (get_model_metadata) and the state's shape from it;
  2. runs one inference with explicit state: the whole text from a zero state_in, then the text
     again one character at a time, passing state_out back as state_in;
  3. runs the text as a sequence (sequence_id, sequence_start on the first request, sequence_end on the
     last), one character per request, the server holding the state;
and prints the most likely next character after each input character, for each of the three.

The vocabulary (the characters in id order) is the model file's `vocab` metadata; Triton does not
report it, so it is an argument.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient


def infer(client: grpcclient.InferenceServerClient, model: str, ids: list[int], state: np.ndarray | None = None,
          **sequence: object) -> tuple[np.ndarray, np.ndarray | None]:
    """logits [seq, vocab] for one row of ids (and state_out [layers, size] when state was given)."""
    batch = np.array([ids], dtype=np.int64)
    inputs = [grpcclient.InferInput("input_ids", list(batch.shape), "INT64")]
    inputs[0].set_data_from_numpy(batch)
    outputs = [grpcclient.InferRequestedOutput("logits")]
    if state is not None:
        inputs.append(grpcclient.InferInput("state_in", [1, *state.shape], "FP32"))
        inputs[1].set_data_from_numpy(state[None].astype(np.float32))
        outputs.append(grpcclient.InferRequestedOutput("state_out"))
    result = client.infer(model, inputs, outputs=outputs, **sequence)
    state_out = result.as_numpy("state_out")
    return result.as_numpy("logits")[0], None if state_out is None else state_out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="the server's gRPC address")
    parser.add_argument("--model", default="charrnn", help="the model's name")
    parser.add_argument("--vocab", required=True, help="the characters in id order, as a JSON list")
    parser.add_argument("--text", default="hihell", help="the characters to feed")
    parser.add_argument("--sequence-id", type=int, default=1001, help="the sequence's id (correlation ID)")
    args = parser.parse_args()
    vocab = json.loads(args.vocab)
    ids = [vocab.index(c) for c in args.text]
    best = lambda logits: "".join(vocab[i] for i in logits.argmax(-1))  # noqa: E731

    client = grpcclient.InferenceServerClient(url=args.url)
    metadata = client.get_model_metadata(args.model)
    print("model", metadata.name, "versions", list(metadata.versions), "platform", metadata.platform)
    for tensor in (*metadata.inputs, *metadata.outputs):
        print(f"  {tensor.name} {tensor.datatype} {list(tensor.shape)}")
    state_in = next(t for t in metadata.inputs if t.name == "state_in")
    zero = np.zeros([int(d) for d in state_in.shape[1:]], dtype=np.float32)

    logits, _ = infer(client, args.model, ids, zero)
    print("explicit state, whole text:   ", best(logits))
    state, chars = zero, ""
    for i in ids:
        logits, state = infer(client, args.model, [i], state)
        chars += best(logits)
    print("explicit state, char by char: ", chars)

    chars = ""
    for n, i in enumerate(ids):
        logits, _ = infer(client, args.model, [i], sequence_id=args.sequence_id, sequence_start=n == 0,
                          sequence_end=n == len(ids) - 1)
        chars += best(logits)
    print("sequence", args.sequence_id, "char by char:  ", chars)
    client.close()


if __name__ == "__main__":
    main()
