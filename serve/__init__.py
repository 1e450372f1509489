"""The serving stage: a gRPC API (protos/charrnn/v1/charrnn.proto) over an onnxruntime session.

Never imports torch: the server reads nothing but the exported .onnx file.
"""
