"""The HTTP transport, a sibling of serve/api/grpc/ over the same service layer: the OpenAI-compatible
completions API (openai_protocol.py, openai_serving.py), KServe v2 REST (kserve.py), the routes (app.py),
what every call passes through (calls.py), server-sent events (sse.py), and uvicorn in the server's loop
(server.py)."""
