"""``lightning-prune``: LightningCLI with the pruning callback as its own ``--pruning.*`` argument group.

    lightning-prune fit --config conf/cli/digits.yaml --pruning.target_sparsity 0.8 --pruning.pattern 2:4

Any LightningModule and LightningDataModule can be named by ``class_path``; the defaults are the
digits demo (``lightning_prune.demo``), which needs no download.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_prune.callback import PruningCallback
from lightning_prune.quiet import mute_lightning_noise


class PruningCLI(LightningCLI):
    """LightningCLI that always adds a :class:`PruningCallback` configured by ``--pruning.*``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PruningCallback, "pruning")


def run(args: list[str] | None = None) -> PruningCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``) and return it, trainer and model included."""
    from lightning_prune.demo import DigitsClassifier, DigitsDataModule

    mute_lightning_noise()
    return PruningCLI(
        DigitsClassifier,
        DigitsDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def main(args: list[str] | None = None) -> None:
    """The console script: run the CLI and return nothing.

    The generated script calls ``sys.exit(main())``; anything but ``None`` or 0 there would be printed
    and turned into exit status 1 after a successful run.
    """
    run(args)


if __name__ == "__main__":
    main()
