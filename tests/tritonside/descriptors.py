"""Print the descriptors of the protocol files tritonclient ships, for comparison with protos/inference.

    .venv-triton/bin/python tests/tritonside/descriptors.py

Prints JSON: the installed tritonclient and protobuf versions, and `descriptor_set`, a base64
FileDescriptorSet holding tritonclient's grpc_service.proto and model_config.proto. The comparison
itself runs in the main environment, which reads the set with its own protobuf.
"""

import base64
import json
from importlib import metadata

from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2


def main() -> None:
    files = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        module.DESCRIPTOR.CopyToProto(files.file.add())
    print(json.dumps({
        "versions": {name: metadata.version(name) for name in ("tritonclient", "protobuf", "grpcio")},
        "descriptor_set": base64.b64encode(files.SerializeToString()).decode("ascii"),
    }))


if __name__ == "__main__":
    main()
