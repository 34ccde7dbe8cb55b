"""Japanese instruction -> pipeline: an OpenAI-compatible LLM planner and a deterministic offline planner."""
