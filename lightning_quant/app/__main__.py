"""``python -m lightning_quant.app``: the same as the ``lightning-quant`` command."""

from lightning_quant.app.main import main

if __name__ == "__main__":
    main()
