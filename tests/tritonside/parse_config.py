"""Parse config.pbtxt files as Triton's own ModelConfig message (tritonclient's model_config_pb2).

    .venv-triton/bin/python tests/tritonside/parse_config.py REPO/NAME/config.pbtxt ...

Prints a JSON list, one parsed configuration per file, in order.

text_format.Parse is strict: a field Triton's ModelConfig does not have, a wrong type or a bad enum name
is an error (exit 1 with protobuf's message), as it would be when Triton loads the repository. The JSON
keeps proto field names, enum names as strings, and int64 fields as strings (protobuf's JSON mapping).
"""

import json
import sys

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2


def parse(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        config = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


if __name__ == "__main__":
    print(json.dumps([parse(path) for path in sys.argv[1:]]))
