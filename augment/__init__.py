"""On-device LLM views: runtime, prompts, grounding to the catalog, cache (DESIGN.md §4)."""
