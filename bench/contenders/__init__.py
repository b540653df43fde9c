"""One module per contender, each run as its own process by bench/run.py."""
