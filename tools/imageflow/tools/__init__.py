"""Reference image tools served over imageflow.v1.ToolService (deployed apart from the control plane)."""
