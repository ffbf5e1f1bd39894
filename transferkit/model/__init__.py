"""The classifier: building it (``build.build_model``: precision, backbone and head, the one
way a run's model is built; ``classifier``: the layers), choosing what trains (``surgery``),
the frozen-BatchNorm fold (``fold``) and starting from another run's backbone (``transfer``)."""
