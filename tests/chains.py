"""Step chains that may hop between replicas, for the scale-out tests (local nginx and compose).

Step carries the recurrent state in the request, so a chain of Step calls can go to a different
server each time. A chain starts from one text and then feeds back each reply's `next`; chains of
one model give the same text whichever replicas answer, which is what the tests compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

CHAINS = ["h", "i", "e", "l", "o", "hi"]  # first text of each chain; then each step feeds back `next`
STEPS = 16
KILL_AT = STEPS // 2


class ChainClient:
    """Step chains through one channel; retries UNAVAILABLE (counted), any other error fails the test.

    A retry is safe: Step is a pure function of its request. UNAVAILABLE is what a load balancer
    answers for a call the replica it chose could not finish (it died, or it is draining).
    """

    def __init__(self, target: str) -> None:
        from serve.api.pb.charrnn.v1 import charrnn_pb2, charrnn_pb2_grpc

        self.pb = charrnn_pb2
        self.channel = grpc.insecure_channel(target)
        self.stub = charrnn_pb2_grpc.CharRNNStub(self.channel)
        self.retries = 0

    def step(self, state: bytes, text: str):
        for attempt in range(20):
            try:
                return self.stub.Step(self.pb.StepRequest(state=state, text=text), timeout=20)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.retries += 1
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("Step still UNAVAILABLE after 20 tries")

    def run(self, on_step: Callable[[int], None] | None = None) -> list[str]:
        """All chains side by side, one step of each per round; on_step(round) runs before each round."""
        states = [b""] * len(CHAINS)
        texts = list(CHAINS)
        feed = list(CHAINS)
        for k in range(STEPS):
            if on_step:
                on_step(k)
            for i in range(len(CHAINS)):
                reply = self.step(states[i], feed[i])
                states[i], feed[i] = reply.state, reply.next
                texts[i] += reply.next
        return texts

    def close(self) -> None:
        self.channel.close()
