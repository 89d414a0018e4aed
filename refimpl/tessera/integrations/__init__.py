"""Adapters between Tessera and the training libraries it serves; the core never imports them."""
