"""``python -m lightning_prune``: the same as the ``lightning-prune`` console script."""

from lightning_prune.cli import main

if __name__ == "__main__":
    main()
