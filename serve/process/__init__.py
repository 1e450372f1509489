"""The process boundary: the engine in a process of its own; the proxy on the server side, the child that
runs the scheduler, and the records between them (encoded and decoded in records.py only)."""
