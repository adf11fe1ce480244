"""Generation: sampling, the request that carries a prompt to its last token, the scheduler that
runs requests in batches, and chat sessions that keep their cache across turns."""
