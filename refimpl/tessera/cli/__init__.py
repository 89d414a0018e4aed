"""The ``tessera`` command line: inspect, verify, ls."""
