"""The serving stage: a gRPC API (protos/charrnn/v1/charrnn.proto) over an onnxruntime session.

Read it top down: api/ (gRPC in and out) calls service/ (no gRPC), which calls an engine/ (state,
batching, the model); process/ runs that engine in a process of its own; ops/ assembles and runs the
server; tools/ talk to one. Never imports torch: the server reads nothing but the exported .onnx file.
"""
