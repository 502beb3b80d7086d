"""The Hydra configs of the ``lightning-quant`` command (shipped inside the package as ``lightning_quant.app.conf``)."""
