"""``wavg-fused bench``: time one averaging update of real-shaped models against its peers.

``zoo`` builds the models (no downloads), ``peers`` holds the implementations compared and
``cli`` times them side by side.
"""
