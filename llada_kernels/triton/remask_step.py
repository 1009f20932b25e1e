"""STUB: replaced by the Triton kernel."""
