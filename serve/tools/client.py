"""Reference client for the CharRNN API (protos/charrnn/v1/charrnn.proto).

    python -m serve.client generate --target 127.0.0.1:50051 --prompt "The " --max-chars 200 --seed 1
    python -m serve.client predict  --target 127.0.0.1:50051 hihell --per-char --top-k 3
    python -m serve.client step     --target 127.0.0.1:50051 hi              # prints the state to pass on
    python -m serve.client step     --target 127.0.0.1:50051 hel --state <base64 from the last call>
    python -m serve.client info     --target 127.0.0.1:50051
    python -m serve.client info     --target localhost:50051 --tls-ca ca.pem --token "$TOKEN"   # TLS + token

`generate` writes each character the moment it arrives. Exit status 1 on an RPC error, with the
status code and message on stderr.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator, Sequence

import grpc
from google.protobuf import json_format

from serve.tools.channels import add_arguments, metadata, open_channel
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc


def generate(stub: pb_grpc.CharRNNStub, args: argparse.Namespace) -> None:
    request = pb.GenerateRequest(prompt=args.prompt, max_chars=args.max_chars, top_k=args.top_k, stop=args.stop)
    for name in ("temperature", "top_p", "seed"):  # optional fields: set only when given
        if getattr(args, name) is not None:
            setattr(request, name, getattr(args, name))
    finish = pb.FINISH_REASON_UNSPECIFIED
    for response in stub.Generate(request, timeout=args.timeout, metadata=metadata(args)):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        finish = response.finish_reason
    sys.stdout.write("\n")
    print(f"[{pb.FinishReason.Name(finish)}]", file=sys.stderr)


def _requests(text: str, per_char: bool, top_k: int) -> Iterator[pb.PredictRequest]:
    for chunk in (list(text) if per_char else [text]):
        yield pb.PredictRequest(text=chunk, top_k=top_k)


def _top(candidates: Sequence[pb.Candidate]) -> str:
    return " ".join(f"{c.text!r}:{c.probability:.3f}" for c in candidates)


def predict(stub: pb_grpc.CharRNNStub, args: argparse.Namespace) -> None:
    for r in stub.Predict(_requests(args.text, args.per_char, args.top_k), timeout=args.timeout,
                          metadata=metadata(args)):
        print(f"{r.input!r} -> {r.next!r} p={r.probability:.4f} {_top(r.top)}".rstrip())


def step(stub: pb_grpc.CharRNNStub, args: argparse.Namespace) -> None:
    state = base64.b64decode(args.state) if args.state else b""
    r = stub.Step(pb.StepRequest(state=state, text=args.text, top_k=args.top_k), timeout=args.timeout,
                  metadata=metadata(args))
    print(json.dumps({"next": r.next, "probability": round(r.probability, 6),
                      "top": [[c.text, round(c.probability, 6)] for c in r.top],
                      "state": base64.b64encode(r.state).decode()}))


def info(stub: pb_grpc.CharRNNStub, args: argparse.Namespace) -> None:
    response = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=args.timeout, metadata=metadata(args))
    print(json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True), indent=2))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    common.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    add_arguments(common)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", parents=[common], help="stream sampled text")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-chars", type=int, default=200)
    g.add_argument("--temperature", type=float, help="unset = 1.0; 0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.set_defaults(run=generate)
    pr = sub.add_parser("predict", parents=[common], help="next-character predictions for every character")
    pr.add_argument("text")
    pr.add_argument("--top-k", type=int, default=0)
    pr.add_argument("--per-char", action="store_true", help="send one message per character")
    pr.set_defaults(run=predict)
    s = sub.add_parser("step", parents=[common], help="one stateless step; prints JSON with the new state")
    s.add_argument("text")
    s.add_argument("--state", default="", help="base64 state from a previous step (empty = initial)")
    s.add_argument("--top-k", type=int, default=0)
    s.set_defaults(run=step)
    i = sub.add_parser("info", parents=[common], help="describe the served model")
    i.set_defaults(run=info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with open_channel(args.target, args) as channel:
        try:
            args.run(pb_grpc.CharRNNStub(channel), args)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
