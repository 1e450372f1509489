"""The transport ceiling: a grpc.aio server of the charrnn API that streams one-character Generate
messages with no model behind it. Whatever it achieves, a real server cannot beat.

    python bench/ceiling.py --port 0        # prints "ceiling serving on 127.0.0.1:PORT"

It runs on the same event loop as the server (--event-loop, default auto), so that the ratio compares
the servers and not the loops.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve.ops.loops import CHOICES, loop_factory  # noqa: E402
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb  # noqa: E402
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc  # noqa: E402


class Ceiling(pb_grpc.CharRNNServicer):
    async def Generate(self, request, context):  # noqa: N802 (gRPC's naming)
        last = request.max_chars - 1
        for i in range(request.max_chars):
            yield pb.GenerateResponse(text="a", index=i, logprob=-1.0,
                                      finish_reason=pb.FINISH_REASON_LENGTH if i == last else 0)


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server()
    pb_grpc.add_CharRNNServicer_to_server(Ceiling(), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    print(f"ceiling serving on {args.host}:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--event-loop", default="auto", choices=CHOICES)
    args = p.parse_args()
    factory, _ = loop_factory(args.event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
