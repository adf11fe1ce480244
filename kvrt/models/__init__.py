"""Models: the local store and its fetching, GGUF conversion, configs and rope, tokenizers, and
choosing a backend runtime to load a folder into."""
