"""Pieces shared by the control plane and the tool services."""
