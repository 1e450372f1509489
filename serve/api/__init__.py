"""The wire API: the gRPC servicer, the interceptor chain every call passes, the one error-to-status map,
and the generated stubs (pb/). The only place protobuf messages are converted."""
