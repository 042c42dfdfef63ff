"""Data that exists on every machine, for training tiny models on a CPU: a byte tokenizer, a
stdlib-docstring corpus, exactly scored procedural tasks, and a resumable training stream."""
