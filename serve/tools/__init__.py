"""Tools that talk to a server or check a device: the reference client, the health probe, the GPU check."""
