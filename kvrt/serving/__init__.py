"""Serving: the engine thread that admits requests by KV bytes, the OpenAI-compatible HTTP app and
its Ray Serve replicas."""
