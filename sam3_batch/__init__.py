"""sam3-batch: the command line and the embedded (single-process) runner."""
