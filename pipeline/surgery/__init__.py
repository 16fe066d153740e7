"""Model surgery: rotation sites on weights, norm folding, the rotation plan, online modules, transitions."""
