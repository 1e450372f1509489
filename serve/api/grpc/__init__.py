"""The gRPC transport: the CharRNN and KServe v2 servicers, their interceptor chain, and KServe tensors on the wire."""
