"""``wavg-fused bench``: time one averaging update of real-shaped models against its peers.

``zoo`` builds the models (no downloads), ``peers`` holds the implementations compared,
``timing`` measures (interleaved medians, CUDA events, launch counts), ``cli`` runs and reports,
``plot`` draws the figure and ``progress`` the bar.
"""
