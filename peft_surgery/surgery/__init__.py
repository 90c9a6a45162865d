"""The math: pure functions on tensors and on the canonical Adapter. No file formats here."""
