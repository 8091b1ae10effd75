"""Producer: list inputs, plan chunks, enqueue them with backpressure, resume from a checkpoint."""
