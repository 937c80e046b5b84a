"""On-device LLM views: runtime and backends, prompts, grounding to the catalog, cache (DESIGN.md §4);
SRA-CL's semantic side."""
