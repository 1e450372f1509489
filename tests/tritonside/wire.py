"""Parse messages with tritonclient's classes and write them back: one side of a wire round trip.

    echo '[{"type": "inference.ModelInferRequest", "data": "BASE64"}]' \
        | .venv-triton/bin/python tests/tritonside/wire.py

Reads a JSON list from stdin, each entry a message's full name and its serialized bytes (base64);
prints a JSON list, each entry the message as tritonclient reads it (protobuf's JSON mapping, proto
field names) and its bytes as tritonclient serializes them again (base64).
"""

import base64
import json
import sys

from google.protobuf import json_format, message_factory
from tritonclient.grpc import service_pb2


def main() -> None:
    pool = service_pb2.DESCRIPTOR.pool
    out = []
    for entry in json.load(sys.stdin):
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(entry["type"]))
        msg = cls.FromString(base64.b64decode(entry["data"]))
        out.append({"json": json_format.MessageToDict(msg, preserving_proto_field_name=True),
                    "data": base64.b64encode(msg.SerializeToString(deterministic=True)).decode("ascii")})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
