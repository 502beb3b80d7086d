"""The ``lightning-quant`` commands, apart from the library: the Hydra app, its sweep table, LightningCLI.

The Hydra configs ship inside the package as ``lightning_quant.app.conf`` (the repository's
top-level ``conf/`` folder), so an installed wheel runs from any folder.
"""
