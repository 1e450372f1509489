"""The engine: where the recurrent state lives and where batching happens (the scheduler), over one
onnxruntime session (runtime) and pure sampling; the Engine protocol and the thread engine."""
