"""One adapted backbone, several task heads (classification, generation, extractive QA)."""
