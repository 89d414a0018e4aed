"""The reference backend: ``tessera`` (the Python reference implementation) behind the protocol."""
