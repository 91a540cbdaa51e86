"""Benchmark builders: MT-Shapes (generated) and the official VQA-v2, GQA and ConvBench files -> dialogues.jsonl."""
