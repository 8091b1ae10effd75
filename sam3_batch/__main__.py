"""``python -m sam3_batch`` is the same as the ``sam3-batch`` command."""

from sam3_batch.cli import main

main()
