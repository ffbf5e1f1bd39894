"""The classifier: building it, choosing what trains, and the frozen-BatchNorm fold."""
