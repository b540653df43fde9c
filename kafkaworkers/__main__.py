"""``python -m kafkaworkers`` is the ``kafkaworkers`` command."""

from kafkaworkers.cli import main

main()
