"""How the harness talks to a backend: its declaration, its messages, its process (PROTOCOL.md)."""
