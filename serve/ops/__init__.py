"""Operations: assembling and running the server (health, TLS, drain), settings, --workers, metrics and
the event loop."""
