"""Storage media a checkpoint lives on: the interface and the POSIX directory implementation."""
