"""Reference LVLMs: the recipe that trains them and the tokenizer they use (issue 4, item 5)."""
