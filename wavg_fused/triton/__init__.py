"""The Triton kernel of the ``triton`` backend (imported only when Triton is installed)."""
