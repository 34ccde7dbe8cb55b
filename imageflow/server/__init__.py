"""The ImageFlow control plane."""
