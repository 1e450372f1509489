"""The transport-free service: request validation, text <-> token ids, Step state bytes; calls the engine."""
